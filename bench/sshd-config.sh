# Sourced by bench/run.sh and bench/pairs.sh.
# sshd_config PORT HOST_KEY AUTHORIZED_KEYS: prints the configuration of the
# private sshd the benchmarks measure OpenSSH through (loopback only, public
# keys only, TCP forwarding and ptys allowed, no PAM, no DNS, quiet).
sshd_config() {
    cat <<CONF
Port $1
ListenAddress 127.0.0.1
HostKey $2
PidFile none
UsePAM no
StrictModes no
AuthorizedKeysFile $3
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
AllowTcpForwarding yes
GatewayPorts no
X11Forwarding no
PermitTTY yes
PrintMotd no
PrintLastLog no
UseDNS no
ClientAliveInterval 0
LogLevel ERROR
CONF
}
