# Print an optspec for argparse to handle cmd's options that are independent of any subcommand.
function __fish_towerctl_global_optspecs
    string join \n v/verbose h/help V/version
end

function __fish_towerctl_needs_command
    # Figure out if the current invocation already has a command.
    set -l cmd (commandline -opc)
    set -e cmd[1]
    argparse -s (__fish_towerctl_global_optspecs) -- $cmd 2>/dev/null
    or return
    if set -q argv[1]
        # Also print the command, so this can be used to figure out what it is.
        echo $argv[1]
        return 1
    end
    return 0
end

function __fish_towerctl_using_subcommand
    set -l cmd (__fish_towerctl_needs_command)
    test -z "$cmd"
    and return 1
    contains -- $cmd[1] $argv
end

complete -c towerctl -n "__fish_towerctl_needs_command" -s v -l verbose -d 'More logging (-v info, -vv debug), also in the daemons this command starts in the background (up, join, port-forward); RUST_LOG overrides'
complete -c towerctl -n "__fish_towerctl_needs_command" -s h -l help -d 'Print help'
complete -c towerctl -n "__fish_towerctl_needs_command" -s V -l version -d 'Print version'
complete -c towerctl -n "__fish_towerctl_needs_command" -f -a "up" -d 'Start the hub in the background and print where it listens'
complete -c towerctl -n "__fish_towerctl_needs_command" -f -a "down" -d 'Stop the hub started with `towerctl up`'
complete -c towerctl -n "__fish_towerctl_needs_command" -f -a "hub" -d 'Hub daemon commands'
complete -c towerctl -n "__fish_towerctl_needs_command" -f -a "cluster" -d 'Manage member clusters on the hub'
complete -c towerctl -n "__fish_towerctl_needs_command" -f -a "join" -d 'Join this member to a hub: start an agent daemon in the background'
complete -c towerctl -n "__fish_towerctl_needs_command" -f -a "agent" -d 'Agent daemon commands'
complete -c towerctl -n "__fish_towerctl_needs_command" -f -a "leave" -d 'Stop an agent on this machine and forget its configuration'
complete -c towerctl -n "__fish_towerctl_needs_command" -f -a "use" -d 'Point kubectl at a member: write the `tower-NAME` context and make it current'
complete -c towerctl -n "__fish_towerctl_needs_command" -f -a "port-forward" -d 'Forward local ports to a pod, service or deployment in a member (kubectl syntax)'
complete -c towerctl -n "__fish_towerctl_needs_command" -f -a "kubeconfig" -d 'Print a standalone kubeconfig for some (default: all) members'
complete -c towerctl -n "__fish_towerctl_needs_command" -f -a "kubectl" -d 'Run kubectl against several members at once, with one merged output'
complete -c towerctl -n "__fish_towerctl_needs_command" -f -a "operator" -d 'Manage operators (people and tools allowed through the gateway)'
complete -c towerctl -n "__fish_towerctl_needs_command" -f -a "access" -d 'Which operators may see and reach which members (fail closed: only what a rule allows)'
complete -c towerctl -n "__fish_towerctl_needs_command" -f -a "login" -d 'Use a hub from this machine with an operator token from \'towerctl operator add\''
complete -c towerctl -n "__fish_towerctl_needs_command" -f -a "logout" -d 'Forget a login and its token'
complete -c towerctl -n "__fish_towerctl_needs_command" -f -a "audit" -d 'Show the hub\'s audit log: who reached which cluster, how, with what result'
complete -c towerctl -n "__fish_towerctl_needs_command" -f -a "status" -d 'Show the hub, its members and the agents on this machine'
complete -c towerctl -n "__fish_towerctl_needs_command" -f -a "service" -d 'Install systemd user units for the daemons'
complete -c towerctl -n "__fish_towerctl_needs_command" -f -a "completion" -d 'Print a shell completion script (bash, zsh, fish, powershell, elvish)'
complete -c towerctl -n "__fish_towerctl_needs_command" -f -a "gen-docs" -d 'Write completions/ and man/ under DIR (for packagers; the checked-in copies come from it)'
complete -c towerctl -n "__fish_towerctl_needs_command" -f -a "logs" -d 'Show a daemon\'s log: `hub` or an agent\'s cluster name'
complete -c towerctl -n "__fish_towerctl_needs_command" -f -a "ui" -d 'Live dashboard of the hub\'s members and this machine\'s agents'
complete -c towerctl -n "__fish_towerctl_needs_command" -f -a "credential" -d 'Print an ExecCredential for kubectl (used by kubeconfig entries)'
complete -c towerctl -n "__fish_towerctl_needs_command" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c towerctl -n "__fish_towerctl_using_subcommand up" -l listen -d 'Address for agents\' tunnels (WebSocket)' -r
complete -c towerctl -n "__fish_towerctl_using_subcommand up" -l gateway -d 'Address for the HTTPS gateway kubectl talks to' -r
complete -c towerctl -n "__fish_towerctl_using_subcommand up" -l advertise -d 'Tunnel URL printed in join commands, when agents see the hub under another address (NAT, ingress, wss://)' -r
complete -c towerctl -n "__fish_towerctl_using_subcommand up" -l gateway-url -d 'Gateway URL written into kubeconfigs, when operators see it under another address (https://HOST[:PORT][/PATH])' -r
complete -c towerctl -n "__fish_towerctl_using_subcommand up" -l peer-url -d 'With etcd: the gateway URL the other hubs forward requests to this hub at (default: --gateway-url, else the gateway\'s address). Give each hub its own when --gateway-url names a load balancer in front of several hubs: through it, a request could not reach the hub holding its member\'s tunnel' -r
complete -c towerctl -n "__fish_towerctl_using_subcommand up" -l tls-san -d 'Another name or address the gateway\'s certificate covers (repeatable): a DNS alias or a load balancer\'s IP that operators reach it by besides --gateway-url\'s host' -r
complete -c towerctl -n "__fish_towerctl_using_subcommand up" -l keepalive -d 'Keepalive interval (1s to 1h); a peer silent for three intervals is declared dead' -r
complete -c towerctl -n "__fish_towerctl_using_subcommand up" -l shutdown-delay -d 'On SIGTERM (a pod being stopped), answer 503 on /readyz for this long, still serving, before stopping, so that a load balancer or Service stops sending new connections first (`towerctl down` stops at once). Default: none (0s); in the pod manifest 5s, 30s behind a load balancer' -r
complete -c towerctl -n "__fish_towerctl_using_subcommand up" -l metrics -d 'Address for Prometheus /metrics (loopback by default), or \'off\'' -r
complete -c towerctl -n "__fish_towerctl_using_subcommand up" -l store -d 'Share the registry with other hubs in etcd (etcd://HOST:PORT[,HOST:PORT…], or https://… for TLS); default: the embedded store in the data directory' -r
complete -c towerctl -n "__fish_towerctl_using_subcommand up" -l store-prefix -d 'Key prefix in etcd, to share one etcd between several hub groups' -r
complete -c towerctl -n "__fish_towerctl_using_subcommand up" -l store-max-stale -d 'With etcd: once this hub\'s copy of the registry has gone this long without being confirmed current (etcd or its quorum unreachable from it), operators other than this hub\'s local admin are refused (503), their streams cut and /readyz answers 503, so that a removal or a narrowed rule made on another hub cannot go unheeded here; at least 3s; \'0\' serves from the copy for as long as etcd is away' -r
complete -c towerctl -n "__fish_towerctl_using_subcommand up" -l store-ca -d 'CA bundle (PEM) that issued etcd\'s serving certificate (https:// endpoints; default: the system store)' -r -F
complete -c towerctl -n "__fish_towerctl_using_subcommand up" -l store-cert -d 'Client certificate (PEM) for an etcd that requires one (--client-cert-auth); with --store-key' -r -F
complete -c towerctl -n "__fish_towerctl_using_subcommand up" -l store-key -d 'The client certificate\'s private key (PEM)' -r -F
complete -c towerctl -n "__fish_towerctl_using_subcommand up" -l store-user -d 'User for an etcd with authentication enabled (its role needs readwrite on the keys under --store-prefix); with --store-password-file' -r
complete -c towerctl -n "__fish_towerctl_using_subcommand up" -l store-password-file -d 'File holding --store-user\'s password (its first line; not readable by others), read at start and again at each login to etcd' -r -F
complete -c towerctl -n "__fish_towerctl_using_subcommand up" -l trusted-proxy -d 'Address or network (CIDR) of an ingress or load balancer in front of the hub; repeatable. Connections from it count as from the client it names: in a PROXY protocol header (v1 or v2) or, for HTTP, the address it appends to X-Forwarded-For' -r
complete -c towerctl -n "__fish_towerctl_using_subcommand up" -l namespace -d 'Namespace for --print-manifest' -r
complete -c towerctl -n "__fish_towerctl_using_subcommand up" -l image -d 'Container image for --print-manifest' -r
complete -c towerctl -n "__fish_towerctl_using_subcommand up" -l replicas -d 'Hubs to run, for --print-manifest (default: 2 with --store, else 1; more than one needs --store)' -r
complete -c towerctl -n "__fish_towerctl_using_subcommand up" -l storage-class -d 'StorageClass of the hubs\' volumes, for --print-manifest (default: the cluster\'s default class)' -r
complete -c towerctl -n "__fish_towerctl_using_subcommand up" -l require-proxy-protocol -d 'With --trusted-proxy: every connection from those addresses must start with a PROXY protocol header, and X-Forwarded-For is not read. For a layer-4 load balancer that passes its clients\' bytes on untouched: without it, a client could name any address itself'
complete -c towerctl -n "__fish_towerctl_using_subcommand up" -l print-manifest -d 'Print Kubernetes manifests that run the hub (a StatefulSet, with these flags) instead of starting it here; needs --advertise and --gateway-url'
complete -c towerctl -n "__fish_towerctl_using_subcommand up" -s v -l verbose -d 'More logging (-v info, -vv debug), also in the daemons this command starts in the background (up, join, port-forward); RUST_LOG overrides'
complete -c towerctl -n "__fish_towerctl_using_subcommand up" -s h -l help -d 'Print help'
complete -c towerctl -n "__fish_towerctl_using_subcommand up" -s V -l version -d 'Print version'
complete -c towerctl -n "__fish_towerctl_using_subcommand down" -s v -l verbose -d 'More logging (-v info, -vv debug), also in the daemons this command starts in the background (up, join, port-forward); RUST_LOG overrides'
complete -c towerctl -n "__fish_towerctl_using_subcommand down" -s h -l help -d 'Print help'
complete -c towerctl -n "__fish_towerctl_using_subcommand down" -s V -l version -d 'Print version'
complete -c towerctl -n "__fish_towerctl_using_subcommand hub; and not __fish_seen_subcommand_from run help" -s v -l verbose -d 'More logging (-v info, -vv debug), also in the daemons this command starts in the background (up, join, port-forward); RUST_LOG overrides'
complete -c towerctl -n "__fish_towerctl_using_subcommand hub; and not __fish_seen_subcommand_from run help" -s h -l help -d 'Print help'
complete -c towerctl -n "__fish_towerctl_using_subcommand hub; and not __fish_seen_subcommand_from run help" -s V -l version -d 'Print version'
complete -c towerctl -n "__fish_towerctl_using_subcommand hub; and not __fish_seen_subcommand_from run help" -f -a "run" -d 'Run the hub in the foreground (for containers and systemd)'
complete -c towerctl -n "__fish_towerctl_using_subcommand hub; and not __fish_seen_subcommand_from run help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c towerctl -n "__fish_towerctl_using_subcommand hub; and __fish_seen_subcommand_from run" -l listen -d 'Address for agents\' tunnels (WebSocket)' -r
complete -c towerctl -n "__fish_towerctl_using_subcommand hub; and __fish_seen_subcommand_from run" -l gateway -d 'Address for the HTTPS gateway kubectl talks to' -r
complete -c towerctl -n "__fish_towerctl_using_subcommand hub; and __fish_seen_subcommand_from run" -l advertise -d 'Tunnel URL printed in join commands, when agents see the hub under another address (NAT, ingress, wss://)' -r
complete -c towerctl -n "__fish_towerctl_using_subcommand hub; and __fish_seen_subcommand_from run" -l gateway-url -d 'Gateway URL written into kubeconfigs, when operators see it under another address (https://HOST[:PORT][/PATH])' -r
complete -c towerctl -n "__fish_towerctl_using_subcommand hub; and __fish_seen_subcommand_from run" -l peer-url -d 'With etcd: the gateway URL the other hubs forward requests to this hub at (default: --gateway-url, else the gateway\'s address). Give each hub its own when --gateway-url names a load balancer in front of several hubs: through it, a request could not reach the hub holding its member\'s tunnel' -r
complete -c towerctl -n "__fish_towerctl_using_subcommand hub; and __fish_seen_subcommand_from run" -l tls-san -d 'Another name or address the gateway\'s certificate covers (repeatable): a DNS alias or a load balancer\'s IP that operators reach it by besides --gateway-url\'s host' -r
complete -c towerctl -n "__fish_towerctl_using_subcommand hub; and __fish_seen_subcommand_from run" -l keepalive -d 'Keepalive interval (1s to 1h); a peer silent for three intervals is declared dead' -r
complete -c towerctl -n "__fish_towerctl_using_subcommand hub; and __fish_seen_subcommand_from run" -l shutdown-delay -d 'On SIGTERM (a pod being stopped), answer 503 on /readyz for this long, still serving, before stopping, so that a load balancer or Service stops sending new connections first (`towerctl down` stops at once). Default: none (0s); in the pod manifest 5s, 30s behind a load balancer' -r
complete -c towerctl -n "__fish_towerctl_using_subcommand hub; and __fish_seen_subcommand_from run" -l metrics -d 'Address for Prometheus /metrics (loopback by default), or \'off\'' -r
complete -c towerctl -n "__fish_towerctl_using_subcommand hub; and __fish_seen_subcommand_from run" -l store -d 'Share the registry with other hubs in etcd (etcd://HOST:PORT[,HOST:PORT…], or https://… for TLS); default: the embedded store in the data directory' -r
complete -c towerctl -n "__fish_towerctl_using_subcommand hub; and __fish_seen_subcommand_from run" -l store-prefix -d 'Key prefix in etcd, to share one etcd between several hub groups' -r
complete -c towerctl -n "__fish_towerctl_using_subcommand hub; and __fish_seen_subcommand_from run" -l store-max-stale -d 'With etcd: once this hub\'s copy of the registry has gone this long without being confirmed current (etcd or its quorum unreachable from it), operators other than this hub\'s local admin are refused (503), their streams cut and /readyz answers 503, so that a removal or a narrowed rule made on another hub cannot go unheeded here; at least 3s; \'0\' serves from the copy for as long as etcd is away' -r
complete -c towerctl -n "__fish_towerctl_using_subcommand hub; and __fish_seen_subcommand_from run" -l store-ca -d 'CA bundle (PEM) that issued etcd\'s serving certificate (https:// endpoints; default: the system store)' -r -F
complete -c towerctl -n "__fish_towerctl_using_subcommand hub; and __fish_seen_subcommand_from run" -l store-cert -d 'Client certificate (PEM) for an etcd that requires one (--client-cert-auth); with --store-key' -r -F
complete -c towerctl -n "__fish_towerctl_using_subcommand hub; and __fish_seen_subcommand_from run" -l store-key -d 'The client certificate\'s private key (PEM)' -r -F
complete -c towerctl -n "__fish_towerctl_using_subcommand hub; and __fish_seen_subcommand_from run" -l store-user -d 'User for an etcd with authentication enabled (its role needs readwrite on the keys under --store-prefix); with --store-password-file' -r
complete -c towerctl -n "__fish_towerctl_using_subcommand hub; and __fish_seen_subcommand_from run" -l store-password-file -d 'File holding --store-user\'s password (its first line; not readable by others), read at start and again at each login to etcd' -r -F
complete -c towerctl -n "__fish_towerctl_using_subcommand hub; and __fish_seen_subcommand_from run" -l trusted-proxy -d 'Address or network (CIDR) of an ingress or load balancer in front of the hub; repeatable. Connections from it count as from the client it names: in a PROXY protocol header (v1 or v2) or, for HTTP, the address it appends to X-Forwarded-For' -r
complete -c towerctl -n "__fish_towerctl_using_subcommand hub; and __fish_seen_subcommand_from run" -l require-proxy-protocol -d 'With --trusted-proxy: every connection from those addresses must start with a PROXY protocol header, and X-Forwarded-For is not read. For a layer-4 load balancer that passes its clients\' bytes on untouched: without it, a client could name any address itself'
complete -c towerctl -n "__fish_towerctl_using_subcommand hub; and __fish_seen_subcommand_from run" -s v -l verbose -d 'More logging (-v info, -vv debug), also in the daemons this command starts in the background (up, join, port-forward); RUST_LOG overrides'
complete -c towerctl -n "__fish_towerctl_using_subcommand hub; and __fish_seen_subcommand_from run" -s h -l help -d 'Print help'
complete -c towerctl -n "__fish_towerctl_using_subcommand hub; and __fish_seen_subcommand_from run" -s V -l version -d 'Print version'
complete -c towerctl -n "__fish_towerctl_using_subcommand hub; and __fish_seen_subcommand_from help" -f -a "run" -d 'Run the hub in the foreground (for containers and systemd)'
complete -c towerctl -n "__fish_towerctl_using_subcommand hub; and __fish_seen_subcommand_from help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c towerctl -n "__fish_towerctl_using_subcommand cluster; and not __fish_seen_subcommand_from add set label expose rotate revoke list rm help" -s v -l verbose -d 'More logging (-v info, -vv debug), also in the daemons this command starts in the background (up, join, port-forward); RUST_LOG overrides'
complete -c towerctl -n "__fish_towerctl_using_subcommand cluster; and not __fish_seen_subcommand_from add set label expose rotate revoke list rm help" -s h -l help -d 'Print help'
complete -c towerctl -n "__fish_towerctl_using_subcommand cluster; and not __fish_seen_subcommand_from add set label expose rotate revoke list rm help" -s V -l version -d 'Print version'
complete -c towerctl -n "__fish_towerctl_using_subcommand cluster; and not __fish_seen_subcommand_from add set label expose rotate revoke list rm help" -f -a "add" -d 'Register a member and print the join command (the token is shown once)'
complete -c towerctl -n "__fish_towerctl_using_subcommand cluster; and not __fish_seen_subcommand_from add set label expose rotate revoke list rm help" -f -a "set" -d 'Change a member\'s settings'
complete -c towerctl -n "__fish_towerctl_using_subcommand cluster; and not __fish_seen_subcommand_from add set label expose rotate revoke list rm help" -f -a "label" -d 'Set (KEY=VALUE) or remove (KEY-) labels of a member, like kubectl label'
complete -c towerctl -n "__fish_towerctl_using_subcommand cluster; and not __fish_seen_subcommand_from add set label expose rotate revoke list rm help" -f -a "expose" -d 'Change what a member\'s workloads may reach on the hub side (push mode)'
complete -c towerctl -n "__fish_towerctl_using_subcommand cluster; and not __fish_seen_subcommand_from add set label expose rotate revoke list rm help" -f -a "rotate" -d 'Issue a new join token; the old one stops working at once'
complete -c towerctl -n "__fish_towerctl_using_subcommand cluster; and not __fish_seen_subcommand_from add set label expose rotate revoke list rm help" -f -a "revoke" -d 'Cut the member\'s session now and refuse its agent from now on'
complete -c towerctl -n "__fish_towerctl_using_subcommand cluster; and not __fish_seen_subcommand_from add set label expose rotate revoke list rm help" -f -a "list" -d 'List registered members with their state, agent version, key and token'
complete -c towerctl -n "__fish_towerctl_using_subcommand cluster; and not __fish_seen_subcommand_from add set label expose rotate revoke list rm help" -f -a "rm" -d 'Forget a member: its token and key stop working and its session is cut'
complete -c towerctl -n "__fish_towerctl_using_subcommand cluster; and not __fish_seen_subcommand_from add set label expose rotate revoke list rm help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c towerctl -n "__fish_towerctl_using_subcommand cluster; and __fish_seen_subcommand_from add" -l ttl -d 'Lifetime of the join token (0 = never expires)' -r
complete -c towerctl -n "__fish_towerctl_using_subcommand cluster; and __fish_seen_subcommand_from add" -l expose -d 'Push mode: let the member\'s workloads reach HOST:PORT on the hub side as NAME (repeatable); the agent listens for them' -r
complete -c towerctl -n "__fish_towerctl_using_subcommand cluster; and __fish_seen_subcommand_from add" -l label -d 'A label for selecting members, like env=prod (repeatable)' -r
complete -c towerctl -n "__fish_towerctl_using_subcommand cluster; and __fish_seen_subcommand_from add" -s o -l output -d 'Output format' -r -f -a "text\t''
json\t''"
complete -c towerctl -n "__fish_towerctl_using_subcommand cluster; and __fish_seen_subcommand_from add" -l reusable -d 'Let the join token be used more than once (agent pods recreated without their key)'
complete -c towerctl -n "__fish_towerctl_using_subcommand cluster; and __fish_seen_subcommand_from add" -l impersonate -d 'The member lets the agent impersonate operators (its RBAC decides per operator)'
complete -c towerctl -n "__fish_towerctl_using_subcommand cluster; and __fish_seen_subcommand_from add" -s v -l verbose -d 'More logging (-v info, -vv debug), also in the daemons this command starts in the background (up, join, port-forward); RUST_LOG overrides'
complete -c towerctl -n "__fish_towerctl_using_subcommand cluster; and __fish_seen_subcommand_from add" -s h -l help -d 'Print help'
complete -c towerctl -n "__fish_towerctl_using_subcommand cluster; and __fish_seen_subcommand_from add" -s V -l version -d 'Print version'
complete -c towerctl -n "__fish_towerctl_using_subcommand cluster; and __fish_seen_subcommand_from set" -l impersonate -d 'Each operator acts as itself on the member (Impersonate-User and -Group, so the member\'s RBAC decides); the agent must run with --impersonate'
complete -c towerctl -n "__fish_towerctl_using_subcommand cluster; and __fish_seen_subcommand_from set" -l no-impersonate -d 'Operators act with the agent\'s own identity; the agent must run without --impersonate'
complete -c towerctl -n "__fish_towerctl_using_subcommand cluster; and __fish_seen_subcommand_from set" -s v -l verbose -d 'More logging (-v info, -vv debug), also in the daemons this command starts in the background (up, join, port-forward); RUST_LOG overrides'
complete -c towerctl -n "__fish_towerctl_using_subcommand cluster; and __fish_seen_subcommand_from set" -s h -l help -d 'Print help'
complete -c towerctl -n "__fish_towerctl_using_subcommand cluster; and __fish_seen_subcommand_from set" -s V -l version -d 'Print version'
complete -c towerctl -n "__fish_towerctl_using_subcommand cluster; and __fish_seen_subcommand_from label" -s v -l verbose -d 'More logging (-v info, -vv debug), also in the daemons this command starts in the background (up, join, port-forward); RUST_LOG overrides'
complete -c towerctl -n "__fish_towerctl_using_subcommand cluster; and __fish_seen_subcommand_from label" -s h -l help -d 'Print help'
complete -c towerctl -n "__fish_towerctl_using_subcommand cluster; and __fish_seen_subcommand_from label" -s V -l version -d 'Print version'
complete -c towerctl -n "__fish_towerctl_using_subcommand cluster; and __fish_seen_subcommand_from expose" -l remove -d 'Names to stop exposing' -r
complete -c towerctl -n "__fish_towerctl_using_subcommand cluster; and __fish_seen_subcommand_from expose" -s v -l verbose -d 'More logging (-v info, -vv debug), also in the daemons this command starts in the background (up, join, port-forward); RUST_LOG overrides'
complete -c towerctl -n "__fish_towerctl_using_subcommand cluster; and __fish_seen_subcommand_from expose" -s h -l help -d 'Print help'
complete -c towerctl -n "__fish_towerctl_using_subcommand cluster; and __fish_seen_subcommand_from expose" -s V -l version -d 'Print version'
complete -c towerctl -n "__fish_towerctl_using_subcommand cluster; and __fish_seen_subcommand_from rotate" -l ttl -d 'Lifetime of the join token (0 = never expires)' -r
complete -c towerctl -n "__fish_towerctl_using_subcommand cluster; and __fish_seen_subcommand_from rotate" -s o -l output -d 'Output format' -r -f -a "text\t''
json\t''"
complete -c towerctl -n "__fish_towerctl_using_subcommand cluster; and __fish_seen_subcommand_from rotate" -l reusable -d 'Let the join token be used more than once'
complete -c towerctl -n "__fish_towerctl_using_subcommand cluster; and __fish_seen_subcommand_from rotate" -l new-key -d 'Also retire the agent\'s registered key and cut its session: the agent must join again with the new token (a possibly compromised agent machine)'
complete -c towerctl -n "__fish_towerctl_using_subcommand cluster; and __fish_seen_subcommand_from rotate" -s v -l verbose -d 'More logging (-v info, -vv debug), also in the daemons this command starts in the background (up, join, port-forward); RUST_LOG overrides'
complete -c towerctl -n "__fish_towerctl_using_subcommand cluster; and __fish_seen_subcommand_from rotate" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c towerctl -n "__fish_towerctl_using_subcommand cluster; and __fish_seen_subcommand_from rotate" -s V -l version -d 'Print version'
complete -c towerctl -n "__fish_towerctl_using_subcommand cluster; and __fish_seen_subcommand_from revoke" -s v -l verbose -d 'More logging (-v info, -vv debug), also in the daemons this command starts in the background (up, join, port-forward); RUST_LOG overrides'
complete -c towerctl -n "__fish_towerctl_using_subcommand cluster; and __fish_seen_subcommand_from revoke" -s h -l help -d 'Print help'
complete -c towerctl -n "__fish_towerctl_using_subcommand cluster; and __fish_seen_subcommand_from revoke" -s V -l version -d 'Print version'
complete -c towerctl -n "__fish_towerctl_using_subcommand cluster; and __fish_seen_subcommand_from list" -s o -l output -d 'Output format' -r -f -a "table\t''
wide\t''
json\t''
yaml\t''"
complete -c towerctl -n "__fish_towerctl_using_subcommand cluster; and __fish_seen_subcommand_from list" -s v -l verbose -d 'More logging (-v info, -vv debug), also in the daemons this command starts in the background (up, join, port-forward); RUST_LOG overrides'
complete -c towerctl -n "__fish_towerctl_using_subcommand cluster; and __fish_seen_subcommand_from list" -s h -l help -d 'Print help'
complete -c towerctl -n "__fish_towerctl_using_subcommand cluster; and __fish_seen_subcommand_from list" -s V -l version -d 'Print version'
complete -c towerctl -n "__fish_towerctl_using_subcommand cluster; and __fish_seen_subcommand_from rm" -s v -l verbose -d 'More logging (-v info, -vv debug), also in the daemons this command starts in the background (up, join, port-forward); RUST_LOG overrides'
complete -c towerctl -n "__fish_towerctl_using_subcommand cluster; and __fish_seen_subcommand_from rm" -s h -l help -d 'Print help'
complete -c towerctl -n "__fish_towerctl_using_subcommand cluster; and __fish_seen_subcommand_from rm" -s V -l version -d 'Print version'
complete -c towerctl -n "__fish_towerctl_using_subcommand cluster; and __fish_seen_subcommand_from help" -f -a "add" -d 'Register a member and print the join command (the token is shown once)'
complete -c towerctl -n "__fish_towerctl_using_subcommand cluster; and __fish_seen_subcommand_from help" -f -a "set" -d 'Change a member\'s settings'
complete -c towerctl -n "__fish_towerctl_using_subcommand cluster; and __fish_seen_subcommand_from help" -f -a "label" -d 'Set (KEY=VALUE) or remove (KEY-) labels of a member, like kubectl label'
complete -c towerctl -n "__fish_towerctl_using_subcommand cluster; and __fish_seen_subcommand_from help" -f -a "expose" -d 'Change what a member\'s workloads may reach on the hub side (push mode)'
complete -c towerctl -n "__fish_towerctl_using_subcommand cluster; and __fish_seen_subcommand_from help" -f -a "rotate" -d 'Issue a new join token; the old one stops working at once'
complete -c towerctl -n "__fish_towerctl_using_subcommand cluster; and __fish_seen_subcommand_from help" -f -a "revoke" -d 'Cut the member\'s session now and refuse its agent from now on'
complete -c towerctl -n "__fish_towerctl_using_subcommand cluster; and __fish_seen_subcommand_from help" -f -a "list" -d 'List registered members with their state, agent version, key and token'
complete -c towerctl -n "__fish_towerctl_using_subcommand cluster; and __fish_seen_subcommand_from help" -f -a "rm" -d 'Forget a member: its token and key stop working and its session is cut'
complete -c towerctl -n "__fish_towerctl_using_subcommand cluster; and __fish_seen_subcommand_from help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c towerctl -n "__fish_towerctl_using_subcommand join" -l hub -d 'Hub tunnel URL (ws://HOST:PORT/tunnel or wss://…); repeat it for several hubs of one group: the agent tries them in turn' -r
complete -c towerctl -n "__fish_towerctl_using_subcommand join" -l token -d 'Join token printed by `towerctl cluster add` (or TOWERCTL_TOKEN)' -r
complete -c towerctl -n "__fish_towerctl_using_subcommand join" -l key-file -d 'The agent\'s private key (default: created next to its config). With --print-manifest: the key the Secret gets (a new one if not given)' -r -F
complete -c towerctl -n "__fish_towerctl_using_subcommand join" -l hub-key -d 'Fingerprint of the hub\'s host key (sha256:…), printed by `cluster add`' -r
complete -c towerctl -n "__fish_towerctl_using_subcommand join" -l proxy -d 'HTTP proxy (CONNECT) to reach the hub through, http://[USER:PASSWORD@]HOST:PORT (or TOWERCTL_PROXY); without it, HTTPS_PROXY/HTTP_PROXY and NO_PROXY of the environment, saved with the agent for a later run. Shipped in the Secret with --print-manifest, which does not take this machine\'s variables' -r
complete -c towerctl -n "__fish_towerctl_using_subcommand join" -l hub-ca -d 'CA certificates (PEM bundle) to trust for a wss:// hub behind an ingress, besides the web PKI roots and the system store (SSL_CERT_FILE/SSL_CERT_DIR); read again when it changes' -r -F
complete -c towerctl -n "__fish_towerctl_using_subcommand join" -l kubeconfig -d 'Kubeconfig of the member\'s API server (default: KUBECONFIG, ~/.kube/config, or in-cluster)' -r -F
complete -c towerctl -n "__fish_towerctl_using_subcommand join" -l keepalive -d 'Keepalive interval, in whole seconds' -r
complete -c towerctl -n "__fish_towerctl_using_subcommand join" -l allow -d 'Also let the hub dial HOST[:PORT], CIDR[:PORT] or *.SUFFIX[:PORT] in the member network (repeatable; the cluster\'s services, pods and deployments are always allowed; IPv6 with a port in brackets: [fd00::/8]:443)' -r
complete -c towerctl -n "__fish_towerctl_using_subcommand join" -l expose -d 'Push mode: listen on ADDR for the member\'s workloads and carry them to the hub-side service the hub exposes as NAME (repeatable)' -r
complete -c towerctl -n "__fish_towerctl_using_subcommand join" -l pod-network -d 'How to reach pods: their IPs (\'direct\'), the API server\'s pods/portforward (\'portforward\', for agents outside the pod network), or IPs first (\'auto\')' -r
complete -c towerctl -n "__fish_towerctl_using_subcommand join" -l backoff-cap -d 'Longest wait between reconnection attempts' -r
complete -c towerctl -n "__fish_towerctl_using_subcommand join" -l probe-addr -d 'Serve /healthz (alive) and /readyz (tunnel up) over HTTP on ADDR, e.g. 127.0.0.1:8081 (off by default; the pod manifest turns it on)' -r
complete -c towerctl -n "__fish_towerctl_using_subcommand join" -l serviceaccount-dir -d 'In-cluster credentials: directory of the service account\'s token, ca.crt and namespace, used with KUBERNETES_SERVICE_HOST/PORT (default: /var/run/secrets/kubernetes.io/serviceaccount when KUBERNETES_SERVICE_HOST is set and KUBECONFIG is not)' -r -F
complete -c towerctl -n "__fish_towerctl_using_subcommand join" -l timeout -d 'How long to wait for the tunnel before giving up' -r
complete -c towerctl -n "__fish_towerctl_using_subcommand join" -l namespace -d 'Namespace for --print-manifest' -r
complete -c towerctl -n "__fish_towerctl_using_subcommand join" -l image -d 'Container image for --print-manifest' -r
complete -c towerctl -n "__fish_towerctl_using_subcommand join" -l impersonate -d 'Add the calling operator\'s identity as Impersonate-User/Group headers (the member\'s RBAC must grant the agent \'impersonate\')'
complete -c towerctl -n "__fish_towerctl_using_subcommand join" -l insecure-skip-hub-key -d 'Do not verify the hub\'s host key (unsafe: anyone on the path can impersonate the hub)'
complete -c towerctl -n "__fish_towerctl_using_subcommand join" -l insecure-skip-tls-verify -d 'Do not verify the wss:// certificate (the WebSocket layer only: the --hub-key pin still authenticates the hub); refused with --insecure-skip-hub-key'
complete -c towerctl -n "__fish_towerctl_using_subcommand join" -l print-manifest -d 'Print Kubernetes manifests that run the agent in the member instead of starting it here'
complete -c towerctl -n "__fish_towerctl_using_subcommand join" -s v -l verbose -d 'More logging (-v info, -vv debug), also in the daemons this command starts in the background (up, join, port-forward); RUST_LOG overrides'
complete -c towerctl -n "__fish_towerctl_using_subcommand join" -s h -l help -d 'Print help'
complete -c towerctl -n "__fish_towerctl_using_subcommand join" -s V -l version -d 'Print version'
complete -c towerctl -n "__fish_towerctl_using_subcommand agent; and not __fish_seen_subcommand_from run help" -s v -l verbose -d 'More logging (-v info, -vv debug), also in the daemons this command starts in the background (up, join, port-forward); RUST_LOG overrides'
complete -c towerctl -n "__fish_towerctl_using_subcommand agent; and not __fish_seen_subcommand_from run help" -s h -l help -d 'Print help'
complete -c towerctl -n "__fish_towerctl_using_subcommand agent; and not __fish_seen_subcommand_from run help" -s V -l version -d 'Print version'
complete -c towerctl -n "__fish_towerctl_using_subcommand agent; and not __fish_seen_subcommand_from run help" -f -a "run" -d 'Run an agent in the foreground (for containers and systemd)'
complete -c towerctl -n "__fish_towerctl_using_subcommand agent; and not __fish_seen_subcommand_from run help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c towerctl -n "__fish_towerctl_using_subcommand agent; and __fish_seen_subcommand_from run" -l hub -d 'Hub tunnel URL (ws://HOST:PORT/tunnel or wss://…); repeat it for several hubs of one group: the agent tries them in turn' -r
complete -c towerctl -n "__fish_towerctl_using_subcommand agent; and __fish_seen_subcommand_from run" -l token -d 'Join token printed by `towerctl cluster add` (or TOWERCTL_TOKEN)' -r
complete -c towerctl -n "__fish_towerctl_using_subcommand agent; and __fish_seen_subcommand_from run" -l key-file -d 'The agent\'s private key (default: created next to its config). With --print-manifest: the key the Secret gets (a new one if not given)' -r -F
complete -c towerctl -n "__fish_towerctl_using_subcommand agent; and __fish_seen_subcommand_from run" -l hub-key -d 'Fingerprint of the hub\'s host key (sha256:…), printed by `cluster add`' -r
complete -c towerctl -n "__fish_towerctl_using_subcommand agent; and __fish_seen_subcommand_from run" -l proxy -d 'HTTP proxy (CONNECT) to reach the hub through, http://[USER:PASSWORD@]HOST:PORT (or TOWERCTL_PROXY); without it, HTTPS_PROXY/HTTP_PROXY and NO_PROXY of the environment, saved with the agent for a later run. Shipped in the Secret with --print-manifest, which does not take this machine\'s variables' -r
complete -c towerctl -n "__fish_towerctl_using_subcommand agent; and __fish_seen_subcommand_from run" -l hub-ca -d 'CA certificates (PEM bundle) to trust for a wss:// hub behind an ingress, besides the web PKI roots and the system store (SSL_CERT_FILE/SSL_CERT_DIR); read again when it changes' -r -F
complete -c towerctl -n "__fish_towerctl_using_subcommand agent; and __fish_seen_subcommand_from run" -l kubeconfig -d 'Kubeconfig of the member\'s API server (default: KUBECONFIG, ~/.kube/config, or in-cluster)' -r -F
complete -c towerctl -n "__fish_towerctl_using_subcommand agent; and __fish_seen_subcommand_from run" -l keepalive -d 'Keepalive interval, in whole seconds' -r
complete -c towerctl -n "__fish_towerctl_using_subcommand agent; and __fish_seen_subcommand_from run" -l allow -d 'Also let the hub dial HOST[:PORT], CIDR[:PORT] or *.SUFFIX[:PORT] in the member network (repeatable; the cluster\'s services, pods and deployments are always allowed; IPv6 with a port in brackets: [fd00::/8]:443)' -r
complete -c towerctl -n "__fish_towerctl_using_subcommand agent; and __fish_seen_subcommand_from run" -l expose -d 'Push mode: listen on ADDR for the member\'s workloads and carry them to the hub-side service the hub exposes as NAME (repeatable)' -r
complete -c towerctl -n "__fish_towerctl_using_subcommand agent; and __fish_seen_subcommand_from run" -l pod-network -d 'How to reach pods: their IPs (\'direct\'), the API server\'s pods/portforward (\'portforward\', for agents outside the pod network), or IPs first (\'auto\')' -r
complete -c towerctl -n "__fish_towerctl_using_subcommand agent; and __fish_seen_subcommand_from run" -l backoff-cap -d 'Longest wait between reconnection attempts' -r
complete -c towerctl -n "__fish_towerctl_using_subcommand agent; and __fish_seen_subcommand_from run" -l probe-addr -d 'Serve /healthz (alive) and /readyz (tunnel up) over HTTP on ADDR, e.g. 127.0.0.1:8081 (off by default; the pod manifest turns it on)' -r
complete -c towerctl -n "__fish_towerctl_using_subcommand agent; and __fish_seen_subcommand_from run" -l serviceaccount-dir -d 'In-cluster credentials: directory of the service account\'s token, ca.crt and namespace, used with KUBERNETES_SERVICE_HOST/PORT (default: /var/run/secrets/kubernetes.io/serviceaccount when KUBERNETES_SERVICE_HOST is set and KUBECONFIG is not)' -r -F
complete -c towerctl -n "__fish_towerctl_using_subcommand agent; and __fish_seen_subcommand_from run" -l config -d 'Read the agent\'s settings from a file saved by `join`' -r -F
complete -c towerctl -n "__fish_towerctl_using_subcommand agent; and __fish_seen_subcommand_from run" -l impersonate -d 'Add the calling operator\'s identity as Impersonate-User/Group headers (the member\'s RBAC must grant the agent \'impersonate\')'
complete -c towerctl -n "__fish_towerctl_using_subcommand agent; and __fish_seen_subcommand_from run" -l insecure-skip-hub-key -d 'Do not verify the hub\'s host key (unsafe: anyone on the path can impersonate the hub)'
complete -c towerctl -n "__fish_towerctl_using_subcommand agent; and __fish_seen_subcommand_from run" -l insecure-skip-tls-verify -d 'Do not verify the wss:// certificate (the WebSocket layer only: the --hub-key pin still authenticates the hub); refused with --insecure-skip-hub-key'
complete -c towerctl -n "__fish_towerctl_using_subcommand agent; and __fish_seen_subcommand_from run" -s v -l verbose -d 'More logging (-v info, -vv debug), also in the daemons this command starts in the background (up, join, port-forward); RUST_LOG overrides'
complete -c towerctl -n "__fish_towerctl_using_subcommand agent; and __fish_seen_subcommand_from run" -s h -l help -d 'Print help'
complete -c towerctl -n "__fish_towerctl_using_subcommand agent; and __fish_seen_subcommand_from run" -s V -l version -d 'Print version'
complete -c towerctl -n "__fish_towerctl_using_subcommand agent; and __fish_seen_subcommand_from help" -f -a "run" -d 'Run an agent in the foreground (for containers and systemd)'
complete -c towerctl -n "__fish_towerctl_using_subcommand agent; and __fish_seen_subcommand_from help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c towerctl -n "__fish_towerctl_using_subcommand leave" -s v -l verbose -d 'More logging (-v info, -vv debug), also in the daemons this command starts in the background (up, join, port-forward); RUST_LOG overrides'
complete -c towerctl -n "__fish_towerctl_using_subcommand leave" -s h -l help -d 'Print help'
complete -c towerctl -n "__fish_towerctl_using_subcommand leave" -s V -l version -d 'Print version'
complete -c towerctl -n "__fish_towerctl_using_subcommand use" -l gateway -d 'Gateway of a hub logged in to (default: the hub on this machine, else the last login)' -r
complete -c towerctl -n "__fish_towerctl_using_subcommand use" -l kubeconfig -d 'Kubeconfig file to edit (default: KUBECONFIG\'s first existing file, or ~/.kube/config)' -r -F
complete -c towerctl -n "__fish_towerctl_using_subcommand use" -s v -l verbose -d 'More logging (-v info, -vv debug), also in the daemons this command starts in the background (up, join, port-forward); RUST_LOG overrides'
complete -c towerctl -n "__fish_towerctl_using_subcommand use" -s h -l help -d 'Print help'
complete -c towerctl -n "__fish_towerctl_using_subcommand use" -s V -l version -d 'Print version'
complete -c towerctl -n "__fish_towerctl_using_subcommand port-forward" -l daemon-id -d 'Internal: the ID of a background forward this process serves' -r
complete -c towerctl -n "__fish_towerctl_using_subcommand port-forward" -s n -l namespace -d 'Namespace of the resource (default: the namespace of the cluster\'s kubeconfig context `tower-CLUSTER`, else `default`)' -r
complete -c towerctl -n "__fish_towerctl_using_subcommand port-forward" -l address -d 'Local addresses to listen on (comma-separated or repeated): IPs or localhost' -r
complete -c towerctl -n "__fish_towerctl_using_subcommand port-forward" -l gateway -d 'Gateway of a hub logged in to (default: the hub on this machine, else the last login)' -r
complete -c towerctl -n "__fish_towerctl_using_subcommand port-forward" -l background -d 'Keep forwarding in the background after this command returns'
complete -c towerctl -n "__fish_towerctl_using_subcommand port-forward" -l all -d 'With `stop`: end every background forward'
complete -c towerctl -n "__fish_towerctl_using_subcommand port-forward" -s v -l verbose -d 'More logging (-v info, -vv debug), also in the daemons this command starts in the background (up, join, port-forward); RUST_LOG overrides'
complete -c towerctl -n "__fish_towerctl_using_subcommand port-forward" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c towerctl -n "__fish_towerctl_using_subcommand port-forward" -s V -l version -d 'Print version'
complete -c towerctl -n "__fish_towerctl_using_subcommand kubeconfig" -l gateway -d 'Gateway of a hub logged in to (default: the hub on this machine, else the last login)' -r
complete -c towerctl -n "__fish_towerctl_using_subcommand kubeconfig" -s v -l verbose -d 'More logging (-v info, -vv debug), also in the daemons this command starts in the background (up, join, port-forward); RUST_LOG overrides'
complete -c towerctl -n "__fish_towerctl_using_subcommand kubeconfig" -s h -l help -d 'Print help'
complete -c towerctl -n "__fish_towerctl_using_subcommand kubeconfig" -s V -l version -d 'Print version'
complete -c towerctl -n "__fish_towerctl_using_subcommand kubectl" -s l -l selector -d 'Members whose labels match SELECTOR (env=prod, env!=dev, \'env in (a,b)\', \'env notin (a)\', canary, !canary; commas join)' -r
complete -c towerctl -n "__fish_towerctl_using_subcommand kubectl" -l parallel -d 'How many kubectl run at once (default 8; for a follow or a watch, every member)' -r
complete -c towerctl -n "__fish_towerctl_using_subcommand kubectl" -l timeout -d 'Longest one member\'s kubectl may run; it is then stopped and reported (default 60s; no limit for a follow or a watch: -f, -w)' -r
complete -c towerctl -n "__fish_towerctl_using_subcommand kubectl" -l gateway -d 'Gateway of a hub logged in to (default: the hub on this machine, else the last login)' -r
complete -c towerctl -n "__fish_towerctl_using_subcommand kubectl" -s v -l verbose -d 'More logging (-v info, -vv debug), also in the daemons this command starts in the background (up, join, port-forward); RUST_LOG overrides'
complete -c towerctl -n "__fish_towerctl_using_subcommand kubectl" -s h -l help -d 'Print help'
complete -c towerctl -n "__fish_towerctl_using_subcommand kubectl" -s V -l version -d 'Print version'
complete -c towerctl -n "__fish_towerctl_using_subcommand operator; and not __fish_seen_subcommand_from add list rm help" -s v -l verbose -d 'More logging (-v info, -vv debug), also in the daemons this command starts in the background (up, join, port-forward); RUST_LOG overrides'
complete -c towerctl -n "__fish_towerctl_using_subcommand operator; and not __fish_seen_subcommand_from add list rm help" -s h -l help -d 'Print help'
complete -c towerctl -n "__fish_towerctl_using_subcommand operator; and not __fish_seen_subcommand_from add list rm help" -s V -l version -d 'Print version'
complete -c towerctl -n "__fish_towerctl_using_subcommand operator; and not __fish_seen_subcommand_from add list rm help" -f -a "add" -d 'Issue an operator token and print the \'towerctl login\' command for it'
complete -c towerctl -n "__fish_towerctl_using_subcommand operator; and not __fish_seen_subcommand_from add list rm help" -f -a "list" -d 'List operators'
complete -c towerctl -n "__fish_towerctl_using_subcommand operator; and not __fish_seen_subcommand_from add list rm help" -f -a "rm" -d 'Remove an operator; its token stops working at once'
complete -c towerctl -n "__fish_towerctl_using_subcommand operator; and not __fish_seen_subcommand_from add list rm help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c towerctl -n "__fish_towerctl_using_subcommand operator; and __fish_seen_subcommand_from add" -l group -d 'Kubernetes groups of the operator (repeatable)' -r
complete -c towerctl -n "__fish_towerctl_using_subcommand operator; and __fish_seen_subcommand_from add" -s v -l verbose -d 'More logging (-v info, -vv debug), also in the daemons this command starts in the background (up, join, port-forward); RUST_LOG overrides'
complete -c towerctl -n "__fish_towerctl_using_subcommand operator; and __fish_seen_subcommand_from add" -s h -l help -d 'Print help'
complete -c towerctl -n "__fish_towerctl_using_subcommand operator; and __fish_seen_subcommand_from add" -s V -l version -d 'Print version'
complete -c towerctl -n "__fish_towerctl_using_subcommand operator; and __fish_seen_subcommand_from list" -s o -l output -r -f -a "table\t''
json\t''"
complete -c towerctl -n "__fish_towerctl_using_subcommand operator; and __fish_seen_subcommand_from list" -s v -l verbose -d 'More logging (-v info, -vv debug), also in the daemons this command starts in the background (up, join, port-forward); RUST_LOG overrides'
complete -c towerctl -n "__fish_towerctl_using_subcommand operator; and __fish_seen_subcommand_from list" -s h -l help -d 'Print help'
complete -c towerctl -n "__fish_towerctl_using_subcommand operator; and __fish_seen_subcommand_from list" -s V -l version -d 'Print version'
complete -c towerctl -n "__fish_towerctl_using_subcommand operator; and __fish_seen_subcommand_from rm" -s v -l verbose -d 'More logging (-v info, -vv debug), also in the daemons this command starts in the background (up, join, port-forward); RUST_LOG overrides'
complete -c towerctl -n "__fish_towerctl_using_subcommand operator; and __fish_seen_subcommand_from rm" -s h -l help -d 'Print help'
complete -c towerctl -n "__fish_towerctl_using_subcommand operator; and __fish_seen_subcommand_from rm" -s V -l version -d 'Print version'
complete -c towerctl -n "__fish_towerctl_using_subcommand operator; and __fish_seen_subcommand_from help" -f -a "add" -d 'Issue an operator token and print the \'towerctl login\' command for it'
complete -c towerctl -n "__fish_towerctl_using_subcommand operator; and __fish_seen_subcommand_from help" -f -a "list" -d 'List operators'
complete -c towerctl -n "__fish_towerctl_using_subcommand operator; and __fish_seen_subcommand_from help" -f -a "rm" -d 'Remove an operator; its token stops working at once'
complete -c towerctl -n "__fish_towerctl_using_subcommand operator; and __fish_seen_subcommand_from help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c towerctl -n "__fish_towerctl_using_subcommand access; and not __fish_seen_subcommand_from allow deny rm list help" -s v -l verbose -d 'More logging (-v info, -vv debug), also in the daemons this command starts in the background (up, join, port-forward); RUST_LOG overrides'
complete -c towerctl -n "__fish_towerctl_using_subcommand access; and not __fish_seen_subcommand_from allow deny rm list help" -s h -l help -d 'Print help'
complete -c towerctl -n "__fish_towerctl_using_subcommand access; and not __fish_seen_subcommand_from allow deny rm list help" -s V -l version -d 'Print version'
complete -c towerctl -n "__fish_towerctl_using_subcommand access; and not __fish_seen_subcommand_from allow deny rm list help" -f -a "allow" -d 'Let an operator or group see and reach the selected members'
complete -c towerctl -n "__fish_towerctl_using_subcommand access; and not __fish_seen_subcommand_from allow deny rm list help" -f -a "deny" -d 'Refuse an operator or group the selected members (deny wins over allow)'
complete -c towerctl -n "__fish_towerctl_using_subcommand access; and not __fish_seen_subcommand_from allow deny rm list help" -f -a "rm" -d 'Remove a rule by its id (open streams it no longer allows are cut)'
complete -c towerctl -n "__fish_towerctl_using_subcommand access; and not __fish_seen_subcommand_from allow deny rm list help" -f -a "list" -d 'List the rules'
complete -c towerctl -n "__fish_towerctl_using_subcommand access; and not __fish_seen_subcommand_from allow deny rm list help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c towerctl -n "__fish_towerctl_using_subcommand access; and __fish_seen_subcommand_from allow" -l clusters -d 'Members by label selector (\'team=payments,env in (dev,staging)\')' -r
complete -c towerctl -n "__fish_towerctl_using_subcommand access; and __fish_seen_subcommand_from allow" -l names -d 'Members by name' -r
complete -c towerctl -n "__fish_towerctl_using_subcommand access; and __fish_seen_subcommand_from allow" -s v -l verbose -d 'More logging (-v info, -vv debug), also in the daemons this command starts in the background (up, join, port-forward); RUST_LOG overrides'
complete -c towerctl -n "__fish_towerctl_using_subcommand access; and __fish_seen_subcommand_from allow" -s h -l help -d 'Print help'
complete -c towerctl -n "__fish_towerctl_using_subcommand access; and __fish_seen_subcommand_from allow" -s V -l version -d 'Print version'
complete -c towerctl -n "__fish_towerctl_using_subcommand access; and __fish_seen_subcommand_from deny" -l clusters -d 'Members by label selector (\'team=payments,env in (dev,staging)\')' -r
complete -c towerctl -n "__fish_towerctl_using_subcommand access; and __fish_seen_subcommand_from deny" -l names -d 'Members by name' -r
complete -c towerctl -n "__fish_towerctl_using_subcommand access; and __fish_seen_subcommand_from deny" -s v -l verbose -d 'More logging (-v info, -vv debug), also in the daemons this command starts in the background (up, join, port-forward); RUST_LOG overrides'
complete -c towerctl -n "__fish_towerctl_using_subcommand access; and __fish_seen_subcommand_from deny" -s h -l help -d 'Print help'
complete -c towerctl -n "__fish_towerctl_using_subcommand access; and __fish_seen_subcommand_from deny" -s V -l version -d 'Print version'
complete -c towerctl -n "__fish_towerctl_using_subcommand access; and __fish_seen_subcommand_from rm" -s v -l verbose -d 'More logging (-v info, -vv debug), also in the daemons this command starts in the background (up, join, port-forward); RUST_LOG overrides'
complete -c towerctl -n "__fish_towerctl_using_subcommand access; and __fish_seen_subcommand_from rm" -s h -l help -d 'Print help'
complete -c towerctl -n "__fish_towerctl_using_subcommand access; and __fish_seen_subcommand_from rm" -s V -l version -d 'Print version'
complete -c towerctl -n "__fish_towerctl_using_subcommand access; and __fish_seen_subcommand_from list" -s o -l output -r -f -a "table\t''
json\t''"
complete -c towerctl -n "__fish_towerctl_using_subcommand access; and __fish_seen_subcommand_from list" -s v -l verbose -d 'More logging (-v info, -vv debug), also in the daemons this command starts in the background (up, join, port-forward); RUST_LOG overrides'
complete -c towerctl -n "__fish_towerctl_using_subcommand access; and __fish_seen_subcommand_from list" -s h -l help -d 'Print help'
complete -c towerctl -n "__fish_towerctl_using_subcommand access; and __fish_seen_subcommand_from list" -s V -l version -d 'Print version'
complete -c towerctl -n "__fish_towerctl_using_subcommand access; and __fish_seen_subcommand_from help" -f -a "allow" -d 'Let an operator or group see and reach the selected members'
complete -c towerctl -n "__fish_towerctl_using_subcommand access; and __fish_seen_subcommand_from help" -f -a "deny" -d 'Refuse an operator or group the selected members (deny wins over allow)'
complete -c towerctl -n "__fish_towerctl_using_subcommand access; and __fish_seen_subcommand_from help" -f -a "rm" -d 'Remove a rule by its id (open streams it no longer allows are cut)'
complete -c towerctl -n "__fish_towerctl_using_subcommand access; and __fish_seen_subcommand_from help" -f -a "list" -d 'List the rules'
complete -c towerctl -n "__fish_towerctl_using_subcommand access; and __fish_seen_subcommand_from help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c towerctl -n "__fish_towerctl_using_subcommand login" -l token -d 'Operator token' -r
complete -c towerctl -n "__fish_towerctl_using_subcommand login" -l ca-hash -d 'sha256 of the gateway CA, printed by \'towerctl operator add\'' -r
complete -c towerctl -n "__fish_towerctl_using_subcommand login" -l insecure-skip-ca-hash -d 'Trust the CA the gateway presents without checking it (unsafe)'
complete -c towerctl -n "__fish_towerctl_using_subcommand login" -s v -l verbose -d 'More logging (-v info, -vv debug), also in the daemons this command starts in the background (up, join, port-forward); RUST_LOG overrides'
complete -c towerctl -n "__fish_towerctl_using_subcommand login" -s h -l help -d 'Print help'
complete -c towerctl -n "__fish_towerctl_using_subcommand login" -s V -l version -d 'Print version'
complete -c towerctl -n "__fish_towerctl_using_subcommand logout" -s v -l verbose -d 'More logging (-v info, -vv debug), also in the daemons this command starts in the background (up, join, port-forward); RUST_LOG overrides'
complete -c towerctl -n "__fish_towerctl_using_subcommand logout" -s h -l help -d 'Print help'
complete -c towerctl -n "__fish_towerctl_using_subcommand logout" -s V -l version -d 'Print version'
complete -c towerctl -n "__fish_towerctl_using_subcommand audit" -l cluster -d 'Only this cluster' -r
complete -c towerctl -n "__fish_towerctl_using_subcommand audit" -l operator -d 'Only this operator' -r
complete -c towerctl -n "__fish_towerctl_using_subcommand audit" -s o -l output -d 'Output format' -r -f -a "table\t''
json\t''"
complete -c towerctl -n "__fish_towerctl_using_subcommand audit" -s f -l follow -d 'Keep printing new records'
complete -c towerctl -n "__fish_towerctl_using_subcommand audit" -s v -l verbose -d 'More logging (-v info, -vv debug), also in the daemons this command starts in the background (up, join, port-forward); RUST_LOG overrides'
complete -c towerctl -n "__fish_towerctl_using_subcommand audit" -s h -l help -d 'Print help'
complete -c towerctl -n "__fish_towerctl_using_subcommand audit" -s V -l version -d 'Print version'
complete -c towerctl -n "__fish_towerctl_using_subcommand status" -s o -l output -d 'Output format' -r -f -a "table\t''
wide\t''
json\t''
yaml\t''"
complete -c towerctl -n "__fish_towerctl_using_subcommand status" -s v -l verbose -d 'More logging (-v info, -vv debug), also in the daemons this command starts in the background (up, join, port-forward); RUST_LOG overrides'
complete -c towerctl -n "__fish_towerctl_using_subcommand status" -s h -l help -d 'Print help'
complete -c towerctl -n "__fish_towerctl_using_subcommand status" -s V -l version -d 'Print version'
complete -c towerctl -n "__fish_towerctl_using_subcommand service; and not __fish_seen_subcommand_from install help" -s v -l verbose -d 'More logging (-v info, -vv debug), also in the daemons this command starts in the background (up, join, port-forward); RUST_LOG overrides'
complete -c towerctl -n "__fish_towerctl_using_subcommand service; and not __fish_seen_subcommand_from install help" -s h -l help -d 'Print help'
complete -c towerctl -n "__fish_towerctl_using_subcommand service; and not __fish_seen_subcommand_from install help" -s V -l version -d 'Print version'
complete -c towerctl -n "__fish_towerctl_using_subcommand service; and not __fish_seen_subcommand_from install help" -f -a "install" -d 'Write a systemd user unit (Type=notify) for the hub or an agent'
complete -c towerctl -n "__fish_towerctl_using_subcommand service; and not __fish_seen_subcommand_from install help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c towerctl -n "__fish_towerctl_using_subcommand service; and __fish_seen_subcommand_from install" -s v -l verbose -d 'More logging (-v info, -vv debug), also in the daemons this command starts in the background (up, join, port-forward); RUST_LOG overrides'
complete -c towerctl -n "__fish_towerctl_using_subcommand service; and __fish_seen_subcommand_from install" -s h -l help -d 'Print help'
complete -c towerctl -n "__fish_towerctl_using_subcommand service; and __fish_seen_subcommand_from install" -s V -l version -d 'Print version'
complete -c towerctl -n "__fish_towerctl_using_subcommand service; and __fish_seen_subcommand_from install" -f -a "hub" -d 'The hub, with the same flags as \'towerctl up\''
complete -c towerctl -n "__fish_towerctl_using_subcommand service; and __fish_seen_subcommand_from install" -f -a "agent" -d 'An agent joined on this machine (\'towerctl join\' first)'
complete -c towerctl -n "__fish_towerctl_using_subcommand service; and __fish_seen_subcommand_from install" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c towerctl -n "__fish_towerctl_using_subcommand service; and __fish_seen_subcommand_from help" -f -a "install" -d 'Write a systemd user unit (Type=notify) for the hub or an agent'
complete -c towerctl -n "__fish_towerctl_using_subcommand service; and __fish_seen_subcommand_from help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c towerctl -n "__fish_towerctl_using_subcommand completion" -s v -l verbose -d 'More logging (-v info, -vv debug), also in the daemons this command starts in the background (up, join, port-forward); RUST_LOG overrides'
complete -c towerctl -n "__fish_towerctl_using_subcommand completion" -s h -l help -d 'Print help'
complete -c towerctl -n "__fish_towerctl_using_subcommand completion" -s V -l version -d 'Print version'
complete -c towerctl -n "__fish_towerctl_using_subcommand gen-docs" -s v -l verbose -d 'More logging (-v info, -vv debug), also in the daemons this command starts in the background (up, join, port-forward); RUST_LOG overrides'
complete -c towerctl -n "__fish_towerctl_using_subcommand gen-docs" -s h -l help -d 'Print help'
complete -c towerctl -n "__fish_towerctl_using_subcommand gen-docs" -s V -l version -d 'Print version'
complete -c towerctl -n "__fish_towerctl_using_subcommand logs" -l tail -d 'Lines from the end to show first' -r
complete -c towerctl -n "__fish_towerctl_using_subcommand logs" -s f -l follow -d 'Keep printing new lines'
complete -c towerctl -n "__fish_towerctl_using_subcommand logs" -s v -l verbose -d 'More logging (-v info, -vv debug), also in the daemons this command starts in the background (up, join, port-forward); RUST_LOG overrides'
complete -c towerctl -n "__fish_towerctl_using_subcommand logs" -s h -l help -d 'Print help'
complete -c towerctl -n "__fish_towerctl_using_subcommand logs" -s V -l version -d 'Print version'
complete -c towerctl -n "__fish_towerctl_using_subcommand ui" -l kubeconfig -d 'Kubeconfig file Enter edits (default: KUBECONFIG\'s first existing file, or ~/.kube/config)' -r -F
complete -c towerctl -n "__fish_towerctl_using_subcommand ui" -s v -l verbose -d 'More logging (-v info, -vv debug), also in the daemons this command starts in the background (up, join, port-forward); RUST_LOG overrides'
complete -c towerctl -n "__fish_towerctl_using_subcommand ui" -s h -l help -d 'Print help'
complete -c towerctl -n "__fish_towerctl_using_subcommand ui" -s V -l version -d 'Print version'
complete -c towerctl -n "__fish_towerctl_using_subcommand credential" -l token-file -d 'File holding the operator token (the hub machine\'s local admin)' -r -F
complete -c towerctl -n "__fish_towerctl_using_subcommand credential" -l gateway -d 'Gateway of a hub logged in to: the token comes from the keyring' -r
complete -c towerctl -n "__fish_towerctl_using_subcommand credential" -s v -l verbose -d 'More logging (-v info, -vv debug), also in the daemons this command starts in the background (up, join, port-forward); RUST_LOG overrides'
complete -c towerctl -n "__fish_towerctl_using_subcommand credential" -s h -l help -d 'Print help'
complete -c towerctl -n "__fish_towerctl_using_subcommand credential" -s V -l version -d 'Print version'
complete -c towerctl -n "__fish_towerctl_using_subcommand help; and not __fish_seen_subcommand_from up down hub cluster join agent leave use port-forward kubeconfig kubectl operator access login logout audit status service completion gen-docs logs ui credential help" -f -a "up" -d 'Start the hub in the background and print where it listens'
complete -c towerctl -n "__fish_towerctl_using_subcommand help; and not __fish_seen_subcommand_from up down hub cluster join agent leave use port-forward kubeconfig kubectl operator access login logout audit status service completion gen-docs logs ui credential help" -f -a "down" -d 'Stop the hub started with `towerctl up`'
complete -c towerctl -n "__fish_towerctl_using_subcommand help; and not __fish_seen_subcommand_from up down hub cluster join agent leave use port-forward kubeconfig kubectl operator access login logout audit status service completion gen-docs logs ui credential help" -f -a "hub" -d 'Hub daemon commands'
complete -c towerctl -n "__fish_towerctl_using_subcommand help; and not __fish_seen_subcommand_from up down hub cluster join agent leave use port-forward kubeconfig kubectl operator access login logout audit status service completion gen-docs logs ui credential help" -f -a "cluster" -d 'Manage member clusters on the hub'
complete -c towerctl -n "__fish_towerctl_using_subcommand help; and not __fish_seen_subcommand_from up down hub cluster join agent leave use port-forward kubeconfig kubectl operator access login logout audit status service completion gen-docs logs ui credential help" -f -a "join" -d 'Join this member to a hub: start an agent daemon in the background'
complete -c towerctl -n "__fish_towerctl_using_subcommand help; and not __fish_seen_subcommand_from up down hub cluster join agent leave use port-forward kubeconfig kubectl operator access login logout audit status service completion gen-docs logs ui credential help" -f -a "agent" -d 'Agent daemon commands'
complete -c towerctl -n "__fish_towerctl_using_subcommand help; and not __fish_seen_subcommand_from up down hub cluster join agent leave use port-forward kubeconfig kubectl operator access login logout audit status service completion gen-docs logs ui credential help" -f -a "leave" -d 'Stop an agent on this machine and forget its configuration'
complete -c towerctl -n "__fish_towerctl_using_subcommand help; and not __fish_seen_subcommand_from up down hub cluster join agent leave use port-forward kubeconfig kubectl operator access login logout audit status service completion gen-docs logs ui credential help" -f -a "use" -d 'Point kubectl at a member: write the `tower-NAME` context and make it current'
complete -c towerctl -n "__fish_towerctl_using_subcommand help; and not __fish_seen_subcommand_from up down hub cluster join agent leave use port-forward kubeconfig kubectl operator access login logout audit status service completion gen-docs logs ui credential help" -f -a "port-forward" -d 'Forward local ports to a pod, service or deployment in a member (kubectl syntax)'
complete -c towerctl -n "__fish_towerctl_using_subcommand help; and not __fish_seen_subcommand_from up down hub cluster join agent leave use port-forward kubeconfig kubectl operator access login logout audit status service completion gen-docs logs ui credential help" -f -a "kubeconfig" -d 'Print a standalone kubeconfig for some (default: all) members'
complete -c towerctl -n "__fish_towerctl_using_subcommand help; and not __fish_seen_subcommand_from up down hub cluster join agent leave use port-forward kubeconfig kubectl operator access login logout audit status service completion gen-docs logs ui credential help" -f -a "kubectl" -d 'Run kubectl against several members at once, with one merged output'
complete -c towerctl -n "__fish_towerctl_using_subcommand help; and not __fish_seen_subcommand_from up down hub cluster join agent leave use port-forward kubeconfig kubectl operator access login logout audit status service completion gen-docs logs ui credential help" -f -a "operator" -d 'Manage operators (people and tools allowed through the gateway)'
complete -c towerctl -n "__fish_towerctl_using_subcommand help; and not __fish_seen_subcommand_from up down hub cluster join agent leave use port-forward kubeconfig kubectl operator access login logout audit status service completion gen-docs logs ui credential help" -f -a "access" -d 'Which operators may see and reach which members (fail closed: only what a rule allows)'
complete -c towerctl -n "__fish_towerctl_using_subcommand help; and not __fish_seen_subcommand_from up down hub cluster join agent leave use port-forward kubeconfig kubectl operator access login logout audit status service completion gen-docs logs ui credential help" -f -a "login" -d 'Use a hub from this machine with an operator token from \'towerctl operator add\''
complete -c towerctl -n "__fish_towerctl_using_subcommand help; and not __fish_seen_subcommand_from up down hub cluster join agent leave use port-forward kubeconfig kubectl operator access login logout audit status service completion gen-docs logs ui credential help" -f -a "logout" -d 'Forget a login and its token'
complete -c towerctl -n "__fish_towerctl_using_subcommand help; and not __fish_seen_subcommand_from up down hub cluster join agent leave use port-forward kubeconfig kubectl operator access login logout audit status service completion gen-docs logs ui credential help" -f -a "audit" -d 'Show the hub\'s audit log: who reached which cluster, how, with what result'
complete -c towerctl -n "__fish_towerctl_using_subcommand help; and not __fish_seen_subcommand_from up down hub cluster join agent leave use port-forward kubeconfig kubectl operator access login logout audit status service completion gen-docs logs ui credential help" -f -a "status" -d 'Show the hub, its members and the agents on this machine'
complete -c towerctl -n "__fish_towerctl_using_subcommand help; and not __fish_seen_subcommand_from up down hub cluster join agent leave use port-forward kubeconfig kubectl operator access login logout audit status service completion gen-docs logs ui credential help" -f -a "service" -d 'Install systemd user units for the daemons'
complete -c towerctl -n "__fish_towerctl_using_subcommand help; and not __fish_seen_subcommand_from up down hub cluster join agent leave use port-forward kubeconfig kubectl operator access login logout audit status service completion gen-docs logs ui credential help" -f -a "completion" -d 'Print a shell completion script (bash, zsh, fish, powershell, elvish)'
complete -c towerctl -n "__fish_towerctl_using_subcommand help; and not __fish_seen_subcommand_from up down hub cluster join agent leave use port-forward kubeconfig kubectl operator access login logout audit status service completion gen-docs logs ui credential help" -f -a "gen-docs" -d 'Write completions/ and man/ under DIR (for packagers; the checked-in copies come from it)'
complete -c towerctl -n "__fish_towerctl_using_subcommand help; and not __fish_seen_subcommand_from up down hub cluster join agent leave use port-forward kubeconfig kubectl operator access login logout audit status service completion gen-docs logs ui credential help" -f -a "logs" -d 'Show a daemon\'s log: `hub` or an agent\'s cluster name'
complete -c towerctl -n "__fish_towerctl_using_subcommand help; and not __fish_seen_subcommand_from up down hub cluster join agent leave use port-forward kubeconfig kubectl operator access login logout audit status service completion gen-docs logs ui credential help" -f -a "ui" -d 'Live dashboard of the hub\'s members and this machine\'s agents'
complete -c towerctl -n "__fish_towerctl_using_subcommand help; and not __fish_seen_subcommand_from up down hub cluster join agent leave use port-forward kubeconfig kubectl operator access login logout audit status service completion gen-docs logs ui credential help" -f -a "credential" -d 'Print an ExecCredential for kubectl (used by kubeconfig entries)'
complete -c towerctl -n "__fish_towerctl_using_subcommand help; and not __fish_seen_subcommand_from up down hub cluster join agent leave use port-forward kubeconfig kubectl operator access login logout audit status service completion gen-docs logs ui credential help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c towerctl -n "__fish_towerctl_using_subcommand help; and __fish_seen_subcommand_from hub" -f -a "run" -d 'Run the hub in the foreground (for containers and systemd)'
complete -c towerctl -n "__fish_towerctl_using_subcommand help; and __fish_seen_subcommand_from cluster" -f -a "add" -d 'Register a member and print the join command (the token is shown once)'
complete -c towerctl -n "__fish_towerctl_using_subcommand help; and __fish_seen_subcommand_from cluster" -f -a "set" -d 'Change a member\'s settings'
complete -c towerctl -n "__fish_towerctl_using_subcommand help; and __fish_seen_subcommand_from cluster" -f -a "label" -d 'Set (KEY=VALUE) or remove (KEY-) labels of a member, like kubectl label'
complete -c towerctl -n "__fish_towerctl_using_subcommand help; and __fish_seen_subcommand_from cluster" -f -a "expose" -d 'Change what a member\'s workloads may reach on the hub side (push mode)'
complete -c towerctl -n "__fish_towerctl_using_subcommand help; and __fish_seen_subcommand_from cluster" -f -a "rotate" -d 'Issue a new join token; the old one stops working at once'
complete -c towerctl -n "__fish_towerctl_using_subcommand help; and __fish_seen_subcommand_from cluster" -f -a "revoke" -d 'Cut the member\'s session now and refuse its agent from now on'
complete -c towerctl -n "__fish_towerctl_using_subcommand help; and __fish_seen_subcommand_from cluster" -f -a "list" -d 'List registered members with their state, agent version, key and token'
complete -c towerctl -n "__fish_towerctl_using_subcommand help; and __fish_seen_subcommand_from cluster" -f -a "rm" -d 'Forget a member: its token and key stop working and its session is cut'
complete -c towerctl -n "__fish_towerctl_using_subcommand help; and __fish_seen_subcommand_from agent" -f -a "run" -d 'Run an agent in the foreground (for containers and systemd)'
complete -c towerctl -n "__fish_towerctl_using_subcommand help; and __fish_seen_subcommand_from operator" -f -a "add" -d 'Issue an operator token and print the \'towerctl login\' command for it'
complete -c towerctl -n "__fish_towerctl_using_subcommand help; and __fish_seen_subcommand_from operator" -f -a "list" -d 'List operators'
complete -c towerctl -n "__fish_towerctl_using_subcommand help; and __fish_seen_subcommand_from operator" -f -a "rm" -d 'Remove an operator; its token stops working at once'
complete -c towerctl -n "__fish_towerctl_using_subcommand help; and __fish_seen_subcommand_from access" -f -a "allow" -d 'Let an operator or group see and reach the selected members'
complete -c towerctl -n "__fish_towerctl_using_subcommand help; and __fish_seen_subcommand_from access" -f -a "deny" -d 'Refuse an operator or group the selected members (deny wins over allow)'
complete -c towerctl -n "__fish_towerctl_using_subcommand help; and __fish_seen_subcommand_from access" -f -a "rm" -d 'Remove a rule by its id (open streams it no longer allows are cut)'
complete -c towerctl -n "__fish_towerctl_using_subcommand help; and __fish_seen_subcommand_from access" -f -a "list" -d 'List the rules'
complete -c towerctl -n "__fish_towerctl_using_subcommand help; and __fish_seen_subcommand_from service" -f -a "install" -d 'Write a systemd user unit (Type=notify) for the hub or an agent'
