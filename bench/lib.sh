# Shared by the bench scripts (sourced, not run).

# member_kubeconfig SERVER FILE: writes the kubeconfig a bench member's
# agent uses to reach its upstream (bench_upstream at SERVER, a bearer token
# it does not check).
member_kubeconfig() {
    cat >"$2" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: upstream
  cluster:
    server: $1
users:
- name: bench
  user:
    token: bench
contexts:
- name: upstream
  context:
    cluster: upstream
    user: bench
current-context: upstream
EOF
}
