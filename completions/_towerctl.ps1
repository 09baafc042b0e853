
using namespace System.Management.Automation
using namespace System.Management.Automation.Language

Register-ArgumentCompleter -Native -CommandName 'towerctl' -ScriptBlock {
    param($wordToComplete, $commandAst, $cursorPosition)

    $commandElements = $commandAst.CommandElements
    $command = @(
        'towerctl'
        for ($i = 1; $i -lt $commandElements.Count; $i++) {
            $element = $commandElements[$i]
            if ($element -isnot [StringConstantExpressionAst] -or
                $element.StringConstantType -ne [StringConstantType]::BareWord -or
                $element.Value.StartsWith('-') -or
                $element.Value -eq $wordToComplete) {
                break
        }
        $element.Value
    }) -join ';'

    $completions = @(switch ($command) {
        'towerctl' {
            [CompletionResult]::new('-v', '-v', [CompletionResultType]::ParameterName, 'More logging (-v info, -vv debug), also in the daemons this command starts in the background (up, join, port-forward); RUST_LOG overrides')
            [CompletionResult]::new('--verbose', '--verbose', [CompletionResultType]::ParameterName, 'More logging (-v info, -vv debug), also in the daemons this command starts in the background (up, join, port-forward); RUST_LOG overrides')
            [CompletionResult]::new('-h', '-h', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('--help', '--help', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('-V', '-V ', [CompletionResultType]::ParameterName, 'Print version')
            [CompletionResult]::new('--version', '--version', [CompletionResultType]::ParameterName, 'Print version')
            [CompletionResult]::new('up', 'up', [CompletionResultType]::ParameterValue, 'Start the hub in the background and print where it listens')
            [CompletionResult]::new('down', 'down', [CompletionResultType]::ParameterValue, 'Stop the hub started with `towerctl up`')
            [CompletionResult]::new('hub', 'hub', [CompletionResultType]::ParameterValue, 'Hub daemon commands')
            [CompletionResult]::new('cluster', 'cluster', [CompletionResultType]::ParameterValue, 'Manage member clusters on the hub')
            [CompletionResult]::new('join', 'join', [CompletionResultType]::ParameterValue, 'Join this member to a hub: start an agent daemon in the background')
            [CompletionResult]::new('agent', 'agent', [CompletionResultType]::ParameterValue, 'Agent daemon commands')
            [CompletionResult]::new('leave', 'leave', [CompletionResultType]::ParameterValue, 'Stop an agent on this machine and forget its configuration')
            [CompletionResult]::new('use', 'use', [CompletionResultType]::ParameterValue, 'Point kubectl at a member: write the `tower-NAME` context and make it current')
            [CompletionResult]::new('port-forward', 'port-forward', [CompletionResultType]::ParameterValue, 'Forward local ports to a pod, service or deployment in a member (kubectl syntax)')
            [CompletionResult]::new('kubeconfig', 'kubeconfig', [CompletionResultType]::ParameterValue, 'Print a standalone kubeconfig for some (default: all) members')
            [CompletionResult]::new('kubectl', 'kubectl', [CompletionResultType]::ParameterValue, 'Run kubectl against several members at once, with one merged output')
            [CompletionResult]::new('operator', 'operator', [CompletionResultType]::ParameterValue, 'Manage operators (people and tools allowed through the gateway)')
            [CompletionResult]::new('access', 'access', [CompletionResultType]::ParameterValue, 'Which operators may see and reach which members (fail closed: only what a rule allows)')
            [CompletionResult]::new('login', 'login', [CompletionResultType]::ParameterValue, 'Use a hub from this machine with an operator token from ''towerctl operator add''')
            [CompletionResult]::new('logout', 'logout', [CompletionResultType]::ParameterValue, 'Forget a login and its token')
            [CompletionResult]::new('audit', 'audit', [CompletionResultType]::ParameterValue, 'Show the hub''s audit log: who reached which cluster, how, with what result')
            [CompletionResult]::new('status', 'status', [CompletionResultType]::ParameterValue, 'Show the hub, its members and the agents on this machine')
            [CompletionResult]::new('service', 'service', [CompletionResultType]::ParameterValue, 'Install systemd user units for the daemons')
            [CompletionResult]::new('completion', 'completion', [CompletionResultType]::ParameterValue, 'Print a shell completion script (bash, zsh, fish, powershell, elvish)')
            [CompletionResult]::new('gen-docs', 'gen-docs', [CompletionResultType]::ParameterValue, 'Write completions/ and man/ under DIR (for packagers; the checked-in copies come from it)')
            [CompletionResult]::new('logs', 'logs', [CompletionResultType]::ParameterValue, 'Show a daemon''s log: `hub` or an agent''s cluster name')
            [CompletionResult]::new('ui', 'ui', [CompletionResultType]::ParameterValue, 'Live dashboard of the hub''s members and this machine''s agents')
            [CompletionResult]::new('credential', 'credential', [CompletionResultType]::ParameterValue, 'Print an ExecCredential for kubectl (used by kubeconfig entries)')
            [CompletionResult]::new('help', 'help', [CompletionResultType]::ParameterValue, 'Print this message or the help of the given subcommand(s)')
            break
        }
        'towerctl;up' {
            [CompletionResult]::new('--listen', '--listen', [CompletionResultType]::ParameterName, 'Address for agents'' tunnels (WebSocket)')
            [CompletionResult]::new('--gateway', '--gateway', [CompletionResultType]::ParameterName, 'Address for the HTTPS gateway kubectl talks to')
            [CompletionResult]::new('--advertise', '--advertise', [CompletionResultType]::ParameterName, 'Tunnel URL printed in join commands, when agents see the hub under another address (NAT, ingress, wss://)')
            [CompletionResult]::new('--gateway-url', '--gateway-url', [CompletionResultType]::ParameterName, 'Gateway URL written into kubeconfigs, when operators see it under another address (https://HOST[:PORT][/PATH])')
            [CompletionResult]::new('--peer-url', '--peer-url', [CompletionResultType]::ParameterName, 'With etcd: the gateway URL the other hubs forward requests to this hub at (default: --gateway-url, else the gateway''s address). Give each hub its own when --gateway-url names a load balancer in front of several hubs: through it, a request could not reach the hub holding its member''s tunnel')
            [CompletionResult]::new('--tls-san', '--tls-san', [CompletionResultType]::ParameterName, 'Another name or address the gateway''s certificate covers (repeatable): a DNS alias or a load balancer''s IP that operators reach it by besides --gateway-url''s host')
            [CompletionResult]::new('--keepalive', '--keepalive', [CompletionResultType]::ParameterName, 'Keepalive interval (1s to 1h); a peer silent for three intervals is declared dead')
            [CompletionResult]::new('--shutdown-delay', '--shutdown-delay', [CompletionResultType]::ParameterName, 'On SIGTERM (a pod being stopped), answer 503 on /readyz for this long, still serving, before stopping, so that a load balancer or Service stops sending new connections first (`towerctl down` stops at once). Default: none (0s); in the pod manifest 5s, 30s behind a load balancer')
            [CompletionResult]::new('--metrics', '--metrics', [CompletionResultType]::ParameterName, 'Address for Prometheus /metrics (loopback by default), or ''off''')
            [CompletionResult]::new('--store', '--store', [CompletionResultType]::ParameterName, 'Share the registry with other hubs in etcd (etcd://HOST:PORT[,HOST:PORT…], or https://… for TLS); default: the embedded store in the data directory')
            [CompletionResult]::new('--store-prefix', '--store-prefix', [CompletionResultType]::ParameterName, 'Key prefix in etcd, to share one etcd between several hub groups')
            [CompletionResult]::new('--store-max-stale', '--store-max-stale', [CompletionResultType]::ParameterName, 'With etcd: once this hub''s copy of the registry has gone this long without being confirmed current (etcd or its quorum unreachable from it), operators other than this hub''s local admin are refused (503), their streams cut and /readyz answers 503, so that a removal or a narrowed rule made on another hub cannot go unheeded here; at least 3s; ''0'' serves from the copy for as long as etcd is away')
            [CompletionResult]::new('--store-ca', '--store-ca', [CompletionResultType]::ParameterName, 'CA bundle (PEM) that issued etcd''s serving certificate (https:// endpoints; default: the system store)')
            [CompletionResult]::new('--store-cert', '--store-cert', [CompletionResultType]::ParameterName, 'Client certificate (PEM) for an etcd that requires one (--client-cert-auth); with --store-key')
            [CompletionResult]::new('--store-key', '--store-key', [CompletionResultType]::ParameterName, 'The client certificate''s private key (PEM)')
            [CompletionResult]::new('--store-user', '--store-user', [CompletionResultType]::ParameterName, 'User for an etcd with authentication enabled (its role needs readwrite on the keys under --store-prefix); with --store-password-file')
            [CompletionResult]::new('--store-password-file', '--store-password-file', [CompletionResultType]::ParameterName, 'File holding --store-user''s password (its first line; not readable by others), read at start and again at each login to etcd')
            [CompletionResult]::new('--trusted-proxy', '--trusted-proxy', [CompletionResultType]::ParameterName, 'Address or network (CIDR) of an ingress or load balancer in front of the hub; repeatable. Connections from it count as from the client it names: in a PROXY protocol header (v1 or v2) or, for HTTP, the address it appends to X-Forwarded-For')
            [CompletionResult]::new('--namespace', '--namespace', [CompletionResultType]::ParameterName, 'Namespace for --print-manifest')
            [CompletionResult]::new('--image', '--image', [CompletionResultType]::ParameterName, 'Container image for --print-manifest')
            [CompletionResult]::new('--replicas', '--replicas', [CompletionResultType]::ParameterName, 'Hubs to run, for --print-manifest (default: 2 with --store, else 1; more than one needs --store)')
            [CompletionResult]::new('--storage-class', '--storage-class', [CompletionResultType]::ParameterName, 'StorageClass of the hubs'' volumes, for --print-manifest (default: the cluster''s default class)')
            [CompletionResult]::new('--require-proxy-protocol', '--require-proxy-protocol', [CompletionResultType]::ParameterName, 'With --trusted-proxy: every connection from those addresses must start with a PROXY protocol header, and X-Forwarded-For is not read. For a layer-4 load balancer that passes its clients'' bytes on untouched: without it, a client could name any address itself')
            [CompletionResult]::new('--print-manifest', '--print-manifest', [CompletionResultType]::ParameterName, 'Print Kubernetes manifests that run the hub (a StatefulSet, with these flags) instead of starting it here; needs --advertise and --gateway-url')
            [CompletionResult]::new('-v', '-v', [CompletionResultType]::ParameterName, 'More logging (-v info, -vv debug), also in the daemons this command starts in the background (up, join, port-forward); RUST_LOG overrides')
            [CompletionResult]::new('--verbose', '--verbose', [CompletionResultType]::ParameterName, 'More logging (-v info, -vv debug), also in the daemons this command starts in the background (up, join, port-forward); RUST_LOG overrides')
            [CompletionResult]::new('-h', '-h', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('--help', '--help', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('-V', '-V ', [CompletionResultType]::ParameterName, 'Print version')
            [CompletionResult]::new('--version', '--version', [CompletionResultType]::ParameterName, 'Print version')
            break
        }
        'towerctl;down' {
            [CompletionResult]::new('-v', '-v', [CompletionResultType]::ParameterName, 'More logging (-v info, -vv debug), also in the daemons this command starts in the background (up, join, port-forward); RUST_LOG overrides')
            [CompletionResult]::new('--verbose', '--verbose', [CompletionResultType]::ParameterName, 'More logging (-v info, -vv debug), also in the daemons this command starts in the background (up, join, port-forward); RUST_LOG overrides')
            [CompletionResult]::new('-h', '-h', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('--help', '--help', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('-V', '-V ', [CompletionResultType]::ParameterName, 'Print version')
            [CompletionResult]::new('--version', '--version', [CompletionResultType]::ParameterName, 'Print version')
            break
        }
        'towerctl;hub' {
            [CompletionResult]::new('-v', '-v', [CompletionResultType]::ParameterName, 'More logging (-v info, -vv debug), also in the daemons this command starts in the background (up, join, port-forward); RUST_LOG overrides')
            [CompletionResult]::new('--verbose', '--verbose', [CompletionResultType]::ParameterName, 'More logging (-v info, -vv debug), also in the daemons this command starts in the background (up, join, port-forward); RUST_LOG overrides')
            [CompletionResult]::new('-h', '-h', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('--help', '--help', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('-V', '-V ', [CompletionResultType]::ParameterName, 'Print version')
            [CompletionResult]::new('--version', '--version', [CompletionResultType]::ParameterName, 'Print version')
            [CompletionResult]::new('run', 'run', [CompletionResultType]::ParameterValue, 'Run the hub in the foreground (for containers and systemd)')
            [CompletionResult]::new('help', 'help', [CompletionResultType]::ParameterValue, 'Print this message or the help of the given subcommand(s)')
            break
        }
        'towerctl;hub;run' {
            [CompletionResult]::new('--listen', '--listen', [CompletionResultType]::ParameterName, 'Address for agents'' tunnels (WebSocket)')
            [CompletionResult]::new('--gateway', '--gateway', [CompletionResultType]::ParameterName, 'Address for the HTTPS gateway kubectl talks to')
            [CompletionResult]::new('--advertise', '--advertise', [CompletionResultType]::ParameterName, 'Tunnel URL printed in join commands, when agents see the hub under another address (NAT, ingress, wss://)')
            [CompletionResult]::new('--gateway-url', '--gateway-url', [CompletionResultType]::ParameterName, 'Gateway URL written into kubeconfigs, when operators see it under another address (https://HOST[:PORT][/PATH])')
            [CompletionResult]::new('--peer-url', '--peer-url', [CompletionResultType]::ParameterName, 'With etcd: the gateway URL the other hubs forward requests to this hub at (default: --gateway-url, else the gateway''s address). Give each hub its own when --gateway-url names a load balancer in front of several hubs: through it, a request could not reach the hub holding its member''s tunnel')
            [CompletionResult]::new('--tls-san', '--tls-san', [CompletionResultType]::ParameterName, 'Another name or address the gateway''s certificate covers (repeatable): a DNS alias or a load balancer''s IP that operators reach it by besides --gateway-url''s host')
            [CompletionResult]::new('--keepalive', '--keepalive', [CompletionResultType]::ParameterName, 'Keepalive interval (1s to 1h); a peer silent for three intervals is declared dead')
            [CompletionResult]::new('--shutdown-delay', '--shutdown-delay', [CompletionResultType]::ParameterName, 'On SIGTERM (a pod being stopped), answer 503 on /readyz for this long, still serving, before stopping, so that a load balancer or Service stops sending new connections first (`towerctl down` stops at once). Default: none (0s); in the pod manifest 5s, 30s behind a load balancer')
            [CompletionResult]::new('--metrics', '--metrics', [CompletionResultType]::ParameterName, 'Address for Prometheus /metrics (loopback by default), or ''off''')
            [CompletionResult]::new('--store', '--store', [CompletionResultType]::ParameterName, 'Share the registry with other hubs in etcd (etcd://HOST:PORT[,HOST:PORT…], or https://… for TLS); default: the embedded store in the data directory')
            [CompletionResult]::new('--store-prefix', '--store-prefix', [CompletionResultType]::ParameterName, 'Key prefix in etcd, to share one etcd between several hub groups')
            [CompletionResult]::new('--store-max-stale', '--store-max-stale', [CompletionResultType]::ParameterName, 'With etcd: once this hub''s copy of the registry has gone this long without being confirmed current (etcd or its quorum unreachable from it), operators other than this hub''s local admin are refused (503), their streams cut and /readyz answers 503, so that a removal or a narrowed rule made on another hub cannot go unheeded here; at least 3s; ''0'' serves from the copy for as long as etcd is away')
            [CompletionResult]::new('--store-ca', '--store-ca', [CompletionResultType]::ParameterName, 'CA bundle (PEM) that issued etcd''s serving certificate (https:// endpoints; default: the system store)')
            [CompletionResult]::new('--store-cert', '--store-cert', [CompletionResultType]::ParameterName, 'Client certificate (PEM) for an etcd that requires one (--client-cert-auth); with --store-key')
            [CompletionResult]::new('--store-key', '--store-key', [CompletionResultType]::ParameterName, 'The client certificate''s private key (PEM)')
            [CompletionResult]::new('--store-user', '--store-user', [CompletionResultType]::ParameterName, 'User for an etcd with authentication enabled (its role needs readwrite on the keys under --store-prefix); with --store-password-file')
            [CompletionResult]::new('--store-password-file', '--store-password-file', [CompletionResultType]::ParameterName, 'File holding --store-user''s password (its first line; not readable by others), read at start and again at each login to etcd')
            [CompletionResult]::new('--trusted-proxy', '--trusted-proxy', [CompletionResultType]::ParameterName, 'Address or network (CIDR) of an ingress or load balancer in front of the hub; repeatable. Connections from it count as from the client it names: in a PROXY protocol header (v1 or v2) or, for HTTP, the address it appends to X-Forwarded-For')
            [CompletionResult]::new('--require-proxy-protocol', '--require-proxy-protocol', [CompletionResultType]::ParameterName, 'With --trusted-proxy: every connection from those addresses must start with a PROXY protocol header, and X-Forwarded-For is not read. For a layer-4 load balancer that passes its clients'' bytes on untouched: without it, a client could name any address itself')
            [CompletionResult]::new('-v', '-v', [CompletionResultType]::ParameterName, 'More logging (-v info, -vv debug), also in the daemons this command starts in the background (up, join, port-forward); RUST_LOG overrides')
            [CompletionResult]::new('--verbose', '--verbose', [CompletionResultType]::ParameterName, 'More logging (-v info, -vv debug), also in the daemons this command starts in the background (up, join, port-forward); RUST_LOG overrides')
            [CompletionResult]::new('-h', '-h', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('--help', '--help', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('-V', '-V ', [CompletionResultType]::ParameterName, 'Print version')
            [CompletionResult]::new('--version', '--version', [CompletionResultType]::ParameterName, 'Print version')
            break
        }
        'towerctl;hub;help' {
            [CompletionResult]::new('run', 'run', [CompletionResultType]::ParameterValue, 'Run the hub in the foreground (for containers and systemd)')
            [CompletionResult]::new('help', 'help', [CompletionResultType]::ParameterValue, 'Print this message or the help of the given subcommand(s)')
            break
        }
        'towerctl;hub;help;run' {
            break
        }
        'towerctl;hub;help;help' {
            break
        }
        'towerctl;cluster' {
            [CompletionResult]::new('-v', '-v', [CompletionResultType]::ParameterName, 'More logging (-v info, -vv debug), also in the daemons this command starts in the background (up, join, port-forward); RUST_LOG overrides')
            [CompletionResult]::new('--verbose', '--verbose', [CompletionResultType]::ParameterName, 'More logging (-v info, -vv debug), also in the daemons this command starts in the background (up, join, port-forward); RUST_LOG overrides')
            [CompletionResult]::new('-h', '-h', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('--help', '--help', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('-V', '-V ', [CompletionResultType]::ParameterName, 'Print version')
            [CompletionResult]::new('--version', '--version', [CompletionResultType]::ParameterName, 'Print version')
            [CompletionResult]::new('add', 'add', [CompletionResultType]::ParameterValue, 'Register a member and print the join command (the token is shown once)')
            [CompletionResult]::new('set', 'set', [CompletionResultType]::ParameterValue, 'Change a member''s settings')
            [CompletionResult]::new('label', 'label', [CompletionResultType]::ParameterValue, 'Set (KEY=VALUE) or remove (KEY-) labels of a member, like kubectl label')
            [CompletionResult]::new('expose', 'expose', [CompletionResultType]::ParameterValue, 'Change what a member''s workloads may reach on the hub side (push mode)')
            [CompletionResult]::new('rotate', 'rotate', [CompletionResultType]::ParameterValue, 'Issue a new join token; the old one stops working at once')
            [CompletionResult]::new('revoke', 'revoke', [CompletionResultType]::ParameterValue, 'Cut the member''s session now and refuse its agent from now on')
            [CompletionResult]::new('list', 'list', [CompletionResultType]::ParameterValue, 'List registered members with their state, agent version, key and token')
            [CompletionResult]::new('rm', 'rm', [CompletionResultType]::ParameterValue, 'Forget a member: its token and key stop working and its session is cut')
            [CompletionResult]::new('help', 'help', [CompletionResultType]::ParameterValue, 'Print this message or the help of the given subcommand(s)')
            break
        }
        'towerctl;cluster;add' {
            [CompletionResult]::new('--ttl', '--ttl', [CompletionResultType]::ParameterName, 'Lifetime of the join token (0 = never expires)')
            [CompletionResult]::new('--expose', '--expose', [CompletionResultType]::ParameterName, 'Push mode: let the member''s workloads reach HOST:PORT on the hub side as NAME (repeatable); the agent listens for them')
            [CompletionResult]::new('--label', '--label', [CompletionResultType]::ParameterName, 'A label for selecting members, like env=prod (repeatable)')
            [CompletionResult]::new('-o', '-o', [CompletionResultType]::ParameterName, 'Output format')
            [CompletionResult]::new('--output', '--output', [CompletionResultType]::ParameterName, 'Output format')
            [CompletionResult]::new('--reusable', '--reusable', [CompletionResultType]::ParameterName, 'Let the join token be used more than once (agent pods recreated without their key)')
            [CompletionResult]::new('--impersonate', '--impersonate', [CompletionResultType]::ParameterName, 'The member lets the agent impersonate operators (its RBAC decides per operator)')
            [CompletionResult]::new('-v', '-v', [CompletionResultType]::ParameterName, 'More logging (-v info, -vv debug), also in the daemons this command starts in the background (up, join, port-forward); RUST_LOG overrides')
            [CompletionResult]::new('--verbose', '--verbose', [CompletionResultType]::ParameterName, 'More logging (-v info, -vv debug), also in the daemons this command starts in the background (up, join, port-forward); RUST_LOG overrides')
            [CompletionResult]::new('-h', '-h', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('--help', '--help', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('-V', '-V ', [CompletionResultType]::ParameterName, 'Print version')
            [CompletionResult]::new('--version', '--version', [CompletionResultType]::ParameterName, 'Print version')
            break
        }
        'towerctl;cluster;set' {
            [CompletionResult]::new('--impersonate', '--impersonate', [CompletionResultType]::ParameterName, 'Each operator acts as itself on the member (Impersonate-User and -Group, so the member''s RBAC decides); the agent must run with --impersonate')
            [CompletionResult]::new('--no-impersonate', '--no-impersonate', [CompletionResultType]::ParameterName, 'Operators act with the agent''s own identity; the agent must run without --impersonate')
            [CompletionResult]::new('-v', '-v', [CompletionResultType]::ParameterName, 'More logging (-v info, -vv debug), also in the daemons this command starts in the background (up, join, port-forward); RUST_LOG overrides')
            [CompletionResult]::new('--verbose', '--verbose', [CompletionResultType]::ParameterName, 'More logging (-v info, -vv debug), also in the daemons this command starts in the background (up, join, port-forward); RUST_LOG overrides')
            [CompletionResult]::new('-h', '-h', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('--help', '--help', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('-V', '-V ', [CompletionResultType]::ParameterName, 'Print version')
            [CompletionResult]::new('--version', '--version', [CompletionResultType]::ParameterName, 'Print version')
            break
        }
        'towerctl;cluster;label' {
            [CompletionResult]::new('-v', '-v', [CompletionResultType]::ParameterName, 'More logging (-v info, -vv debug), also in the daemons this command starts in the background (up, join, port-forward); RUST_LOG overrides')
            [CompletionResult]::new('--verbose', '--verbose', [CompletionResultType]::ParameterName, 'More logging (-v info, -vv debug), also in the daemons this command starts in the background (up, join, port-forward); RUST_LOG overrides')
            [CompletionResult]::new('-h', '-h', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('--help', '--help', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('-V', '-V ', [CompletionResultType]::ParameterName, 'Print version')
            [CompletionResult]::new('--version', '--version', [CompletionResultType]::ParameterName, 'Print version')
            break
        }
        'towerctl;cluster;expose' {
            [CompletionResult]::new('--remove', '--remove', [CompletionResultType]::ParameterName, 'Names to stop exposing')
            [CompletionResult]::new('-v', '-v', [CompletionResultType]::ParameterName, 'More logging (-v info, -vv debug), also in the daemons this command starts in the background (up, join, port-forward); RUST_LOG overrides')
            [CompletionResult]::new('--verbose', '--verbose', [CompletionResultType]::ParameterName, 'More logging (-v info, -vv debug), also in the daemons this command starts in the background (up, join, port-forward); RUST_LOG overrides')
            [CompletionResult]::new('-h', '-h', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('--help', '--help', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('-V', '-V ', [CompletionResultType]::ParameterName, 'Print version')
            [CompletionResult]::new('--version', '--version', [CompletionResultType]::ParameterName, 'Print version')
            break
        }
        'towerctl;cluster;rotate' {
            [CompletionResult]::new('--ttl', '--ttl', [CompletionResultType]::ParameterName, 'Lifetime of the join token (0 = never expires)')
            [CompletionResult]::new('-o', '-o', [CompletionResultType]::ParameterName, 'Output format')
            [CompletionResult]::new('--output', '--output', [CompletionResultType]::ParameterName, 'Output format')
            [CompletionResult]::new('--reusable', '--reusable', [CompletionResultType]::ParameterName, 'Let the join token be used more than once')
            [CompletionResult]::new('--new-key', '--new-key', [CompletionResultType]::ParameterName, 'Also retire the agent''s registered key and cut its session: the agent must join again with the new token (a possibly compromised agent machine)')
            [CompletionResult]::new('-v', '-v', [CompletionResultType]::ParameterName, 'More logging (-v info, -vv debug), also in the daemons this command starts in the background (up, join, port-forward); RUST_LOG overrides')
            [CompletionResult]::new('--verbose', '--verbose', [CompletionResultType]::ParameterName, 'More logging (-v info, -vv debug), also in the daemons this command starts in the background (up, join, port-forward); RUST_LOG overrides')
            [CompletionResult]::new('-h', '-h', [CompletionResultType]::ParameterName, 'Print help (see more with ''--help'')')
            [CompletionResult]::new('--help', '--help', [CompletionResultType]::ParameterName, 'Print help (see more with ''--help'')')
            [CompletionResult]::new('-V', '-V ', [CompletionResultType]::ParameterName, 'Print version')
            [CompletionResult]::new('--version', '--version', [CompletionResultType]::ParameterName, 'Print version')
            break
        }
        'towerctl;cluster;revoke' {
            [CompletionResult]::new('-v', '-v', [CompletionResultType]::ParameterName, 'More logging (-v info, -vv debug), also in the daemons this command starts in the background (up, join, port-forward); RUST_LOG overrides')
            [CompletionResult]::new('--verbose', '--verbose', [CompletionResultType]::ParameterName, 'More logging (-v info, -vv debug), also in the daemons this command starts in the background (up, join, port-forward); RUST_LOG overrides')
            [CompletionResult]::new('-h', '-h', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('--help', '--help', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('-V', '-V ', [CompletionResultType]::ParameterName, 'Print version')
            [CompletionResult]::new('--version', '--version', [CompletionResultType]::ParameterName, 'Print version')
            break
        }
        'towerctl;cluster;list' {
            [CompletionResult]::new('-o', '-o', [CompletionResultType]::ParameterName, 'Output format')
            [CompletionResult]::new('--output', '--output', [CompletionResultType]::ParameterName, 'Output format')
            [CompletionResult]::new('-v', '-v', [CompletionResultType]::ParameterName, 'More logging (-v info, -vv debug), also in the daemons this command starts in the background (up, join, port-forward); RUST_LOG overrides')
            [CompletionResult]::new('--verbose', '--verbose', [CompletionResultType]::ParameterName, 'More logging (-v info, -vv debug), also in the daemons this command starts in the background (up, join, port-forward); RUST_LOG overrides')
            [CompletionResult]::new('-h', '-h', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('--help', '--help', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('-V', '-V ', [CompletionResultType]::ParameterName, 'Print version')
            [CompletionResult]::new('--version', '--version', [CompletionResultType]::ParameterName, 'Print version')
            break
        }
        'towerctl;cluster;rm' {
            [CompletionResult]::new('-v', '-v', [CompletionResultType]::ParameterName, 'More logging (-v info, -vv debug), also in the daemons this command starts in the background (up, join, port-forward); RUST_LOG overrides')
            [CompletionResult]::new('--verbose', '--verbose', [CompletionResultType]::ParameterName, 'More logging (-v info, -vv debug), also in the daemons this command starts in the background (up, join, port-forward); RUST_LOG overrides')
            [CompletionResult]::new('-h', '-h', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('--help', '--help', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('-V', '-V ', [CompletionResultType]::ParameterName, 'Print version')
            [CompletionResult]::new('--version', '--version', [CompletionResultType]::ParameterName, 'Print version')
            break
        }
        'towerctl;cluster;help' {
            [CompletionResult]::new('add', 'add', [CompletionResultType]::ParameterValue, 'Register a member and print the join command (the token is shown once)')
            [CompletionResult]::new('set', 'set', [CompletionResultType]::ParameterValue, 'Change a member''s settings')
            [CompletionResult]::new('label', 'label', [CompletionResultType]::ParameterValue, 'Set (KEY=VALUE) or remove (KEY-) labels of a member, like kubectl label')
            [CompletionResult]::new('expose', 'expose', [CompletionResultType]::ParameterValue, 'Change what a member''s workloads may reach on the hub side (push mode)')
            [CompletionResult]::new('rotate', 'rotate', [CompletionResultType]::ParameterValue, 'Issue a new join token; the old one stops working at once')
            [CompletionResult]::new('revoke', 'revoke', [CompletionResultType]::ParameterValue, 'Cut the member''s session now and refuse its agent from now on')
            [CompletionResult]::new('list', 'list', [CompletionResultType]::ParameterValue, 'List registered members with their state, agent version, key and token')
            [CompletionResult]::new('rm', 'rm', [CompletionResultType]::ParameterValue, 'Forget a member: its token and key stop working and its session is cut')
            [CompletionResult]::new('help', 'help', [CompletionResultType]::ParameterValue, 'Print this message or the help of the given subcommand(s)')
            break
        }
        'towerctl;cluster;help;add' {
            break
        }
        'towerctl;cluster;help;set' {
            break
        }
        'towerctl;cluster;help;label' {
            break
        }
        'towerctl;cluster;help;expose' {
            break
        }
        'towerctl;cluster;help;rotate' {
            break
        }
        'towerctl;cluster;help;revoke' {
            break
        }
        'towerctl;cluster;help;list' {
            break
        }
        'towerctl;cluster;help;rm' {
            break
        }
        'towerctl;cluster;help;help' {
            break
        }
        'towerctl;join' {
            [CompletionResult]::new('--hub', '--hub', [CompletionResultType]::ParameterName, 'Hub tunnel URL (ws://HOST:PORT/tunnel or wss://…); repeat it for several hubs of one group: the agent tries them in turn')
            [CompletionResult]::new('--token', '--token', [CompletionResultType]::ParameterName, 'Join token printed by `towerctl cluster add` (or TOWERCTL_TOKEN)')
            [CompletionResult]::new('--key-file', '--key-file', [CompletionResultType]::ParameterName, 'The agent''s private key (default: created next to its config). With --print-manifest: the key the Secret gets (a new one if not given)')
            [CompletionResult]::new('--hub-key', '--hub-key', [CompletionResultType]::ParameterName, 'Fingerprint of the hub''s host key (sha256:…), printed by `cluster add`')
            [CompletionResult]::new('--proxy', '--proxy', [CompletionResultType]::ParameterName, 'HTTP proxy (CONNECT) to reach the hub through, http://[USER:PASSWORD@]HOST:PORT (or TOWERCTL_PROXY); without it, HTTPS_PROXY/HTTP_PROXY and NO_PROXY of the environment, saved with the agent for a later run. Shipped in the Secret with --print-manifest, which does not take this machine''s variables')
            [CompletionResult]::new('--hub-ca', '--hub-ca', [CompletionResultType]::ParameterName, 'CA certificates (PEM bundle) to trust for a wss:// hub behind an ingress, besides the web PKI roots and the system store (SSL_CERT_FILE/SSL_CERT_DIR); read again when it changes')
            [CompletionResult]::new('--kubeconfig', '--kubeconfig', [CompletionResultType]::ParameterName, 'Kubeconfig of the member''s API server (default: KUBECONFIG, ~/.kube/config, or in-cluster)')
            [CompletionResult]::new('--keepalive', '--keepalive', [CompletionResultType]::ParameterName, 'Keepalive interval, in whole seconds')
            [CompletionResult]::new('--allow', '--allow', [CompletionResultType]::ParameterName, 'Also let the hub dial HOST[:PORT], CIDR[:PORT] or *.SUFFIX[:PORT] in the member network (repeatable; the cluster''s services, pods and deployments are always allowed; IPv6 with a port in brackets: [fd00::/8]:443)')
            [CompletionResult]::new('--expose', '--expose', [CompletionResultType]::ParameterName, 'Push mode: listen on ADDR for the member''s workloads and carry them to the hub-side service the hub exposes as NAME (repeatable)')
            [CompletionResult]::new('--pod-network', '--pod-network', [CompletionResultType]::ParameterName, 'How to reach pods: their IPs (''direct''), the API server''s pods/portforward (''portforward'', for agents outside the pod network), or IPs first (''auto'')')
            [CompletionResult]::new('--backoff-cap', '--backoff-cap', [CompletionResultType]::ParameterName, 'Longest wait between reconnection attempts')
            [CompletionResult]::new('--probe-addr', '--probe-addr', [CompletionResultType]::ParameterName, 'Serve /healthz (alive) and /readyz (tunnel up) over HTTP on ADDR, e.g. 127.0.0.1:8081 (off by default; the pod manifest turns it on)')
            [CompletionResult]::new('--serviceaccount-dir', '--serviceaccount-dir', [CompletionResultType]::ParameterName, 'In-cluster credentials: directory of the service account''s token, ca.crt and namespace, used with KUBERNETES_SERVICE_HOST/PORT (default: /var/run/secrets/kubernetes.io/serviceaccount when KUBERNETES_SERVICE_HOST is set and KUBECONFIG is not)')
            [CompletionResult]::new('--timeout', '--timeout', [CompletionResultType]::ParameterName, 'How long to wait for the tunnel before giving up')
            [CompletionResult]::new('--namespace', '--namespace', [CompletionResultType]::ParameterName, 'Namespace for --print-manifest')
            [CompletionResult]::new('--image', '--image', [CompletionResultType]::ParameterName, 'Container image for --print-manifest')
            [CompletionResult]::new('--impersonate', '--impersonate', [CompletionResultType]::ParameterName, 'Add the calling operator''s identity as Impersonate-User/Group headers (the member''s RBAC must grant the agent ''impersonate'')')
            [CompletionResult]::new('--insecure-skip-hub-key', '--insecure-skip-hub-key', [CompletionResultType]::ParameterName, 'Do not verify the hub''s host key (unsafe: anyone on the path can impersonate the hub)')
            [CompletionResult]::new('--insecure-skip-tls-verify', '--insecure-skip-tls-verify', [CompletionResultType]::ParameterName, 'Do not verify the wss:// certificate (the WebSocket layer only: the --hub-key pin still authenticates the hub); refused with --insecure-skip-hub-key')
            [CompletionResult]::new('--print-manifest', '--print-manifest', [CompletionResultType]::ParameterName, 'Print Kubernetes manifests that run the agent in the member instead of starting it here')
            [CompletionResult]::new('-v', '-v', [CompletionResultType]::ParameterName, 'More logging (-v info, -vv debug), also in the daemons this command starts in the background (up, join, port-forward); RUST_LOG overrides')
            [CompletionResult]::new('--verbose', '--verbose', [CompletionResultType]::ParameterName, 'More logging (-v info, -vv debug), also in the daemons this command starts in the background (up, join, port-forward); RUST_LOG overrides')
            [CompletionResult]::new('-h', '-h', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('--help', '--help', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('-V', '-V ', [CompletionResultType]::ParameterName, 'Print version')
            [CompletionResult]::new('--version', '--version', [CompletionResultType]::ParameterName, 'Print version')
            break
        }
        'towerctl;agent' {
            [CompletionResult]::new('-v', '-v', [CompletionResultType]::ParameterName, 'More logging (-v info, -vv debug), also in the daemons this command starts in the background (up, join, port-forward); RUST_LOG overrides')
            [CompletionResult]::new('--verbose', '--verbose', [CompletionResultType]::ParameterName, 'More logging (-v info, -vv debug), also in the daemons this command starts in the background (up, join, port-forward); RUST_LOG overrides')
            [CompletionResult]::new('-h', '-h', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('--help', '--help', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('-V', '-V ', [CompletionResultType]::ParameterName, 'Print version')
            [CompletionResult]::new('--version', '--version', [CompletionResultType]::ParameterName, 'Print version')
            [CompletionResult]::new('run', 'run', [CompletionResultType]::ParameterValue, 'Run an agent in the foreground (for containers and systemd)')
            [CompletionResult]::new('help', 'help', [CompletionResultType]::ParameterValue, 'Print this message or the help of the given subcommand(s)')
            break
        }
        'towerctl;agent;run' {
            [CompletionResult]::new('--hub', '--hub', [CompletionResultType]::ParameterName, 'Hub tunnel URL (ws://HOST:PORT/tunnel or wss://…); repeat it for several hubs of one group: the agent tries them in turn')
            [CompletionResult]::new('--token', '--token', [CompletionResultType]::ParameterName, 'Join token printed by `towerctl cluster add` (or TOWERCTL_TOKEN)')
            [CompletionResult]::new('--key-file', '--key-file', [CompletionResultType]::ParameterName, 'The agent''s private key (default: created next to its config). With --print-manifest: the key the Secret gets (a new one if not given)')
            [CompletionResult]::new('--hub-key', '--hub-key', [CompletionResultType]::ParameterName, 'Fingerprint of the hub''s host key (sha256:…), printed by `cluster add`')
            [CompletionResult]::new('--proxy', '--proxy', [CompletionResultType]::ParameterName, 'HTTP proxy (CONNECT) to reach the hub through, http://[USER:PASSWORD@]HOST:PORT (or TOWERCTL_PROXY); without it, HTTPS_PROXY/HTTP_PROXY and NO_PROXY of the environment, saved with the agent for a later run. Shipped in the Secret with --print-manifest, which does not take this machine''s variables')
            [CompletionResult]::new('--hub-ca', '--hub-ca', [CompletionResultType]::ParameterName, 'CA certificates (PEM bundle) to trust for a wss:// hub behind an ingress, besides the web PKI roots and the system store (SSL_CERT_FILE/SSL_CERT_DIR); read again when it changes')
            [CompletionResult]::new('--kubeconfig', '--kubeconfig', [CompletionResultType]::ParameterName, 'Kubeconfig of the member''s API server (default: KUBECONFIG, ~/.kube/config, or in-cluster)')
            [CompletionResult]::new('--keepalive', '--keepalive', [CompletionResultType]::ParameterName, 'Keepalive interval, in whole seconds')
            [CompletionResult]::new('--allow', '--allow', [CompletionResultType]::ParameterName, 'Also let the hub dial HOST[:PORT], CIDR[:PORT] or *.SUFFIX[:PORT] in the member network (repeatable; the cluster''s services, pods and deployments are always allowed; IPv6 with a port in brackets: [fd00::/8]:443)')
            [CompletionResult]::new('--expose', '--expose', [CompletionResultType]::ParameterName, 'Push mode: listen on ADDR for the member''s workloads and carry them to the hub-side service the hub exposes as NAME (repeatable)')
            [CompletionResult]::new('--pod-network', '--pod-network', [CompletionResultType]::ParameterName, 'How to reach pods: their IPs (''direct''), the API server''s pods/portforward (''portforward'', for agents outside the pod network), or IPs first (''auto'')')
            [CompletionResult]::new('--backoff-cap', '--backoff-cap', [CompletionResultType]::ParameterName, 'Longest wait between reconnection attempts')
            [CompletionResult]::new('--probe-addr', '--probe-addr', [CompletionResultType]::ParameterName, 'Serve /healthz (alive) and /readyz (tunnel up) over HTTP on ADDR, e.g. 127.0.0.1:8081 (off by default; the pod manifest turns it on)')
            [CompletionResult]::new('--serviceaccount-dir', '--serviceaccount-dir', [CompletionResultType]::ParameterName, 'In-cluster credentials: directory of the service account''s token, ca.crt and namespace, used with KUBERNETES_SERVICE_HOST/PORT (default: /var/run/secrets/kubernetes.io/serviceaccount when KUBERNETES_SERVICE_HOST is set and KUBECONFIG is not)')
            [CompletionResult]::new('--config', '--config', [CompletionResultType]::ParameterName, 'Read the agent''s settings from a file saved by `join`')
            [CompletionResult]::new('--impersonate', '--impersonate', [CompletionResultType]::ParameterName, 'Add the calling operator''s identity as Impersonate-User/Group headers (the member''s RBAC must grant the agent ''impersonate'')')
            [CompletionResult]::new('--insecure-skip-hub-key', '--insecure-skip-hub-key', [CompletionResultType]::ParameterName, 'Do not verify the hub''s host key (unsafe: anyone on the path can impersonate the hub)')
            [CompletionResult]::new('--insecure-skip-tls-verify', '--insecure-skip-tls-verify', [CompletionResultType]::ParameterName, 'Do not verify the wss:// certificate (the WebSocket layer only: the --hub-key pin still authenticates the hub); refused with --insecure-skip-hub-key')
            [CompletionResult]::new('-v', '-v', [CompletionResultType]::ParameterName, 'More logging (-v info, -vv debug), also in the daemons this command starts in the background (up, join, port-forward); RUST_LOG overrides')
            [CompletionResult]::new('--verbose', '--verbose', [CompletionResultType]::ParameterName, 'More logging (-v info, -vv debug), also in the daemons this command starts in the background (up, join, port-forward); RUST_LOG overrides')
            [CompletionResult]::new('-h', '-h', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('--help', '--help', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('-V', '-V ', [CompletionResultType]::ParameterName, 'Print version')
            [CompletionResult]::new('--version', '--version', [CompletionResultType]::ParameterName, 'Print version')
            break
        }
        'towerctl;agent;help' {
            [CompletionResult]::new('run', 'run', [CompletionResultType]::ParameterValue, 'Run an agent in the foreground (for containers and systemd)')
            [CompletionResult]::new('help', 'help', [CompletionResultType]::ParameterValue, 'Print this message or the help of the given subcommand(s)')
            break
        }
        'towerctl;agent;help;run' {
            break
        }
        'towerctl;agent;help;help' {
            break
        }
        'towerctl;leave' {
            [CompletionResult]::new('-v', '-v', [CompletionResultType]::ParameterName, 'More logging (-v info, -vv debug), also in the daemons this command starts in the background (up, join, port-forward); RUST_LOG overrides')
            [CompletionResult]::new('--verbose', '--verbose', [CompletionResultType]::ParameterName, 'More logging (-v info, -vv debug), also in the daemons this command starts in the background (up, join, port-forward); RUST_LOG overrides')
            [CompletionResult]::new('-h', '-h', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('--help', '--help', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('-V', '-V ', [CompletionResultType]::ParameterName, 'Print version')
            [CompletionResult]::new('--version', '--version', [CompletionResultType]::ParameterName, 'Print version')
            break
        }
        'towerctl;use' {
            [CompletionResult]::new('--gateway', '--gateway', [CompletionResultType]::ParameterName, 'Gateway of a hub logged in to (default: the hub on this machine, else the last login)')
            [CompletionResult]::new('--kubeconfig', '--kubeconfig', [CompletionResultType]::ParameterName, 'Kubeconfig file to edit (default: KUBECONFIG''s first existing file, or ~/.kube/config)')
            [CompletionResult]::new('-v', '-v', [CompletionResultType]::ParameterName, 'More logging (-v info, -vv debug), also in the daemons this command starts in the background (up, join, port-forward); RUST_LOG overrides')
            [CompletionResult]::new('--verbose', '--verbose', [CompletionResultType]::ParameterName, 'More logging (-v info, -vv debug), also in the daemons this command starts in the background (up, join, port-forward); RUST_LOG overrides')
            [CompletionResult]::new('-h', '-h', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('--help', '--help', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('-V', '-V ', [CompletionResultType]::ParameterName, 'Print version')
            [CompletionResult]::new('--version', '--version', [CompletionResultType]::ParameterName, 'Print version')
            break
        }
        'towerctl;port-forward' {
            [CompletionResult]::new('--daemon-id', '--daemon-id', [CompletionResultType]::ParameterName, 'Internal: the ID of a background forward this process serves')
            [CompletionResult]::new('-n', '-n', [CompletionResultType]::ParameterName, 'Namespace of the resource (default: the namespace of the cluster''s kubeconfig context `tower-CLUSTER`, else `default`)')
            [CompletionResult]::new('--namespace', '--namespace', [CompletionResultType]::ParameterName, 'Namespace of the resource (default: the namespace of the cluster''s kubeconfig context `tower-CLUSTER`, else `default`)')
            [CompletionResult]::new('--address', '--address', [CompletionResultType]::ParameterName, 'Local addresses to listen on (comma-separated or repeated): IPs or localhost')
            [CompletionResult]::new('--gateway', '--gateway', [CompletionResultType]::ParameterName, 'Gateway of a hub logged in to (default: the hub on this machine, else the last login)')
            [CompletionResult]::new('--background', '--background', [CompletionResultType]::ParameterName, 'Keep forwarding in the background after this command returns')
            [CompletionResult]::new('--all', '--all', [CompletionResultType]::ParameterName, 'With `stop`: end every background forward')
            [CompletionResult]::new('-v', '-v', [CompletionResultType]::ParameterName, 'More logging (-v info, -vv debug), also in the daemons this command starts in the background (up, join, port-forward); RUST_LOG overrides')
            [CompletionResult]::new('--verbose', '--verbose', [CompletionResultType]::ParameterName, 'More logging (-v info, -vv debug), also in the daemons this command starts in the background (up, join, port-forward); RUST_LOG overrides')
            [CompletionResult]::new('-h', '-h', [CompletionResultType]::ParameterName, 'Print help (see more with ''--help'')')
            [CompletionResult]::new('--help', '--help', [CompletionResultType]::ParameterName, 'Print help (see more with ''--help'')')
            [CompletionResult]::new('-V', '-V ', [CompletionResultType]::ParameterName, 'Print version')
            [CompletionResult]::new('--version', '--version', [CompletionResultType]::ParameterName, 'Print version')
            break
        }
        'towerctl;kubeconfig' {
            [CompletionResult]::new('--gateway', '--gateway', [CompletionResultType]::ParameterName, 'Gateway of a hub logged in to (default: the hub on this machine, else the last login)')
            [CompletionResult]::new('-v', '-v', [CompletionResultType]::ParameterName, 'More logging (-v info, -vv debug), also in the daemons this command starts in the background (up, join, port-forward); RUST_LOG overrides')
            [CompletionResult]::new('--verbose', '--verbose', [CompletionResultType]::ParameterName, 'More logging (-v info, -vv debug), also in the daemons this command starts in the background (up, join, port-forward); RUST_LOG overrides')
            [CompletionResult]::new('-h', '-h', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('--help', '--help', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('-V', '-V ', [CompletionResultType]::ParameterName, 'Print version')
            [CompletionResult]::new('--version', '--version', [CompletionResultType]::ParameterName, 'Print version')
            break
        }
        'towerctl;kubectl' {
            [CompletionResult]::new('-l', '-l', [CompletionResultType]::ParameterName, 'Members whose labels match SELECTOR (env=prod, env!=dev, ''env in (a,b)'', ''env notin (a)'', canary, !canary; commas join)')
            [CompletionResult]::new('--selector', '--selector', [CompletionResultType]::ParameterName, 'Members whose labels match SELECTOR (env=prod, env!=dev, ''env in (a,b)'', ''env notin (a)'', canary, !canary; commas join)')
            [CompletionResult]::new('--parallel', '--parallel', [CompletionResultType]::ParameterName, 'How many kubectl run at once (default 8; for a follow or a watch, every member)')
            [CompletionResult]::new('--timeout', '--timeout', [CompletionResultType]::ParameterName, 'Longest one member''s kubectl may run; it is then stopped and reported (default 60s; no limit for a follow or a watch: -f, -w)')
            [CompletionResult]::new('--gateway', '--gateway', [CompletionResultType]::ParameterName, 'Gateway of a hub logged in to (default: the hub on this machine, else the last login)')
            [CompletionResult]::new('-v', '-v', [CompletionResultType]::ParameterName, 'More logging (-v info, -vv debug), also in the daemons this command starts in the background (up, join, port-forward); RUST_LOG overrides')
            [CompletionResult]::new('--verbose', '--verbose', [CompletionResultType]::ParameterName, 'More logging (-v info, -vv debug), also in the daemons this command starts in the background (up, join, port-forward); RUST_LOG overrides')
            [CompletionResult]::new('-h', '-h', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('--help', '--help', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('-V', '-V ', [CompletionResultType]::ParameterName, 'Print version')
            [CompletionResult]::new('--version', '--version', [CompletionResultType]::ParameterName, 'Print version')
            break
        }
        'towerctl;operator' {
            [CompletionResult]::new('-v', '-v', [CompletionResultType]::ParameterName, 'More logging (-v info, -vv debug), also in the daemons this command starts in the background (up, join, port-forward); RUST_LOG overrides')
            [CompletionResult]::new('--verbose', '--verbose', [CompletionResultType]::ParameterName, 'More logging (-v info, -vv debug), also in the daemons this command starts in the background (up, join, port-forward); RUST_LOG overrides')
            [CompletionResult]::new('-h', '-h', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('--help', '--help', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('-V', '-V ', [CompletionResultType]::ParameterName, 'Print version')
            [CompletionResult]::new('--version', '--version', [CompletionResultType]::ParameterName, 'Print version')
            [CompletionResult]::new('add', 'add', [CompletionResultType]::ParameterValue, 'Issue an operator token and print the ''towerctl login'' command for it')
            [CompletionResult]::new('list', 'list', [CompletionResultType]::ParameterValue, 'List operators')
            [CompletionResult]::new('rm', 'rm', [CompletionResultType]::ParameterValue, 'Remove an operator; its token stops working at once')
            [CompletionResult]::new('help', 'help', [CompletionResultType]::ParameterValue, 'Print this message or the help of the given subcommand(s)')
            break
        }
        'towerctl;operator;add' {
            [CompletionResult]::new('--group', '--group', [CompletionResultType]::ParameterName, 'Kubernetes groups of the operator (repeatable)')
            [CompletionResult]::new('-v', '-v', [CompletionResultType]::ParameterName, 'More logging (-v info, -vv debug), also in the daemons this command starts in the background (up, join, port-forward); RUST_LOG overrides')
            [CompletionResult]::new('--verbose', '--verbose', [CompletionResultType]::ParameterName, 'More logging (-v info, -vv debug), also in the daemons this command starts in the background (up, join, port-forward); RUST_LOG overrides')
            [CompletionResult]::new('-h', '-h', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('--help', '--help', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('-V', '-V ', [CompletionResultType]::ParameterName, 'Print version')
            [CompletionResult]::new('--version', '--version', [CompletionResultType]::ParameterName, 'Print version')
            break
        }
        'towerctl;operator;list' {
            [CompletionResult]::new('-o', '-o', [CompletionResultType]::ParameterName, 'o')
            [CompletionResult]::new('--output', '--output', [CompletionResultType]::ParameterName, 'output')
            [CompletionResult]::new('-v', '-v', [CompletionResultType]::ParameterName, 'More logging (-v info, -vv debug), also in the daemons this command starts in the background (up, join, port-forward); RUST_LOG overrides')
            [CompletionResult]::new('--verbose', '--verbose', [CompletionResultType]::ParameterName, 'More logging (-v info, -vv debug), also in the daemons this command starts in the background (up, join, port-forward); RUST_LOG overrides')
            [CompletionResult]::new('-h', '-h', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('--help', '--help', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('-V', '-V ', [CompletionResultType]::ParameterName, 'Print version')
            [CompletionResult]::new('--version', '--version', [CompletionResultType]::ParameterName, 'Print version')
            break
        }
        'towerctl;operator;rm' {
            [CompletionResult]::new('-v', '-v', [CompletionResultType]::ParameterName, 'More logging (-v info, -vv debug), also in the daemons this command starts in the background (up, join, port-forward); RUST_LOG overrides')
            [CompletionResult]::new('--verbose', '--verbose', [CompletionResultType]::ParameterName, 'More logging (-v info, -vv debug), also in the daemons this command starts in the background (up, join, port-forward); RUST_LOG overrides')
            [CompletionResult]::new('-h', '-h', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('--help', '--help', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('-V', '-V ', [CompletionResultType]::ParameterName, 'Print version')
            [CompletionResult]::new('--version', '--version', [CompletionResultType]::ParameterName, 'Print version')
            break
        }
        'towerctl;operator;help' {
            [CompletionResult]::new('add', 'add', [CompletionResultType]::ParameterValue, 'Issue an operator token and print the ''towerctl login'' command for it')
            [CompletionResult]::new('list', 'list', [CompletionResultType]::ParameterValue, 'List operators')
            [CompletionResult]::new('rm', 'rm', [CompletionResultType]::ParameterValue, 'Remove an operator; its token stops working at once')
            [CompletionResult]::new('help', 'help', [CompletionResultType]::ParameterValue, 'Print this message or the help of the given subcommand(s)')
            break
        }
        'towerctl;operator;help;add' {
            break
        }
        'towerctl;operator;help;list' {
            break
        }
        'towerctl;operator;help;rm' {
            break
        }
        'towerctl;operator;help;help' {
            break
        }
        'towerctl;access' {
            [CompletionResult]::new('-v', '-v', [CompletionResultType]::ParameterName, 'More logging (-v info, -vv debug), also in the daemons this command starts in the background (up, join, port-forward); RUST_LOG overrides')
            [CompletionResult]::new('--verbose', '--verbose', [CompletionResultType]::ParameterName, 'More logging (-v info, -vv debug), also in the daemons this command starts in the background (up, join, port-forward); RUST_LOG overrides')
            [CompletionResult]::new('-h', '-h', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('--help', '--help', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('-V', '-V ', [CompletionResultType]::ParameterName, 'Print version')
            [CompletionResult]::new('--version', '--version', [CompletionResultType]::ParameterName, 'Print version')
            [CompletionResult]::new('allow', 'allow', [CompletionResultType]::ParameterValue, 'Let an operator or group see and reach the selected members')
            [CompletionResult]::new('deny', 'deny', [CompletionResultType]::ParameterValue, 'Refuse an operator or group the selected members (deny wins over allow)')
            [CompletionResult]::new('rm', 'rm', [CompletionResultType]::ParameterValue, 'Remove a rule by its id (open streams it no longer allows are cut)')
            [CompletionResult]::new('list', 'list', [CompletionResultType]::ParameterValue, 'List the rules')
            [CompletionResult]::new('help', 'help', [CompletionResultType]::ParameterValue, 'Print this message or the help of the given subcommand(s)')
            break
        }
        'towerctl;access;allow' {
            [CompletionResult]::new('--clusters', '--clusters', [CompletionResultType]::ParameterName, 'Members by label selector (''team=payments,env in (dev,staging)'')')
            [CompletionResult]::new('--names', '--names', [CompletionResultType]::ParameterName, 'Members by name')
            [CompletionResult]::new('-v', '-v', [CompletionResultType]::ParameterName, 'More logging (-v info, -vv debug), also in the daemons this command starts in the background (up, join, port-forward); RUST_LOG overrides')
            [CompletionResult]::new('--verbose', '--verbose', [CompletionResultType]::ParameterName, 'More logging (-v info, -vv debug), also in the daemons this command starts in the background (up, join, port-forward); RUST_LOG overrides')
            [CompletionResult]::new('-h', '-h', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('--help', '--help', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('-V', '-V ', [CompletionResultType]::ParameterName, 'Print version')
            [CompletionResult]::new('--version', '--version', [CompletionResultType]::ParameterName, 'Print version')
            break
        }
        'towerctl;access;deny' {
            [CompletionResult]::new('--clusters', '--clusters', [CompletionResultType]::ParameterName, 'Members by label selector (''team=payments,env in (dev,staging)'')')
            [CompletionResult]::new('--names', '--names', [CompletionResultType]::ParameterName, 'Members by name')
            [CompletionResult]::new('-v', '-v', [CompletionResultType]::ParameterName, 'More logging (-v info, -vv debug), also in the daemons this command starts in the background (up, join, port-forward); RUST_LOG overrides')
            [CompletionResult]::new('--verbose', '--verbose', [CompletionResultType]::ParameterName, 'More logging (-v info, -vv debug), also in the daemons this command starts in the background (up, join, port-forward); RUST_LOG overrides')
            [CompletionResult]::new('-h', '-h', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('--help', '--help', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('-V', '-V ', [CompletionResultType]::ParameterName, 'Print version')
            [CompletionResult]::new('--version', '--version', [CompletionResultType]::ParameterName, 'Print version')
            break
        }
        'towerctl;access;rm' {
            [CompletionResult]::new('-v', '-v', [CompletionResultType]::ParameterName, 'More logging (-v info, -vv debug), also in the daemons this command starts in the background (up, join, port-forward); RUST_LOG overrides')
            [CompletionResult]::new('--verbose', '--verbose', [CompletionResultType]::ParameterName, 'More logging (-v info, -vv debug), also in the daemons this command starts in the background (up, join, port-forward); RUST_LOG overrides')
            [CompletionResult]::new('-h', '-h', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('--help', '--help', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('-V', '-V ', [CompletionResultType]::ParameterName, 'Print version')
            [CompletionResult]::new('--version', '--version', [CompletionResultType]::ParameterName, 'Print version')
            break
        }
        'towerctl;access;list' {
            [CompletionResult]::new('-o', '-o', [CompletionResultType]::ParameterName, 'o')
            [CompletionResult]::new('--output', '--output', [CompletionResultType]::ParameterName, 'output')
            [CompletionResult]::new('-v', '-v', [CompletionResultType]::ParameterName, 'More logging (-v info, -vv debug), also in the daemons this command starts in the background (up, join, port-forward); RUST_LOG overrides')
            [CompletionResult]::new('--verbose', '--verbose', [CompletionResultType]::ParameterName, 'More logging (-v info, -vv debug), also in the daemons this command starts in the background (up, join, port-forward); RUST_LOG overrides')
            [CompletionResult]::new('-h', '-h', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('--help', '--help', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('-V', '-V ', [CompletionResultType]::ParameterName, 'Print version')
            [CompletionResult]::new('--version', '--version', [CompletionResultType]::ParameterName, 'Print version')
            break
        }
        'towerctl;access;help' {
            [CompletionResult]::new('allow', 'allow', [CompletionResultType]::ParameterValue, 'Let an operator or group see and reach the selected members')
            [CompletionResult]::new('deny', 'deny', [CompletionResultType]::ParameterValue, 'Refuse an operator or group the selected members (deny wins over allow)')
            [CompletionResult]::new('rm', 'rm', [CompletionResultType]::ParameterValue, 'Remove a rule by its id (open streams it no longer allows are cut)')
            [CompletionResult]::new('list', 'list', [CompletionResultType]::ParameterValue, 'List the rules')
            [CompletionResult]::new('help', 'help', [CompletionResultType]::ParameterValue, 'Print this message or the help of the given subcommand(s)')
            break
        }
        'towerctl;access;help;allow' {
            break
        }
        'towerctl;access;help;deny' {
            break
        }
        'towerctl;access;help;rm' {
            break
        }
        'towerctl;access;help;list' {
            break
        }
        'towerctl;access;help;help' {
            break
        }
        'towerctl;login' {
            [CompletionResult]::new('--token', '--token', [CompletionResultType]::ParameterName, 'Operator token')
            [CompletionResult]::new('--ca-hash', '--ca-hash', [CompletionResultType]::ParameterName, 'sha256 of the gateway CA, printed by ''towerctl operator add''')
            [CompletionResult]::new('--insecure-skip-ca-hash', '--insecure-skip-ca-hash', [CompletionResultType]::ParameterName, 'Trust the CA the gateway presents without checking it (unsafe)')
            [CompletionResult]::new('-v', '-v', [CompletionResultType]::ParameterName, 'More logging (-v info, -vv debug), also in the daemons this command starts in the background (up, join, port-forward); RUST_LOG overrides')
            [CompletionResult]::new('--verbose', '--verbose', [CompletionResultType]::ParameterName, 'More logging (-v info, -vv debug), also in the daemons this command starts in the background (up, join, port-forward); RUST_LOG overrides')
            [CompletionResult]::new('-h', '-h', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('--help', '--help', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('-V', '-V ', [CompletionResultType]::ParameterName, 'Print version')
            [CompletionResult]::new('--version', '--version', [CompletionResultType]::ParameterName, 'Print version')
            break
        }
        'towerctl;logout' {
            [CompletionResult]::new('-v', '-v', [CompletionResultType]::ParameterName, 'More logging (-v info, -vv debug), also in the daemons this command starts in the background (up, join, port-forward); RUST_LOG overrides')
            [CompletionResult]::new('--verbose', '--verbose', [CompletionResultType]::ParameterName, 'More logging (-v info, -vv debug), also in the daemons this command starts in the background (up, join, port-forward); RUST_LOG overrides')
            [CompletionResult]::new('-h', '-h', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('--help', '--help', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('-V', '-V ', [CompletionResultType]::ParameterName, 'Print version')
            [CompletionResult]::new('--version', '--version', [CompletionResultType]::ParameterName, 'Print version')
            break
        }
        'towerctl;audit' {
            [CompletionResult]::new('--cluster', '--cluster', [CompletionResultType]::ParameterName, 'Only this cluster')
            [CompletionResult]::new('--operator', '--operator', [CompletionResultType]::ParameterName, 'Only this operator')
            [CompletionResult]::new('-o', '-o', [CompletionResultType]::ParameterName, 'Output format')
            [CompletionResult]::new('--output', '--output', [CompletionResultType]::ParameterName, 'Output format')
            [CompletionResult]::new('-f', '-f', [CompletionResultType]::ParameterName, 'Keep printing new records')
            [CompletionResult]::new('--follow', '--follow', [CompletionResultType]::ParameterName, 'Keep printing new records')
            [CompletionResult]::new('-v', '-v', [CompletionResultType]::ParameterName, 'More logging (-v info, -vv debug), also in the daemons this command starts in the background (up, join, port-forward); RUST_LOG overrides')
            [CompletionResult]::new('--verbose', '--verbose', [CompletionResultType]::ParameterName, 'More logging (-v info, -vv debug), also in the daemons this command starts in the background (up, join, port-forward); RUST_LOG overrides')
            [CompletionResult]::new('-h', '-h', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('--help', '--help', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('-V', '-V ', [CompletionResultType]::ParameterName, 'Print version')
            [CompletionResult]::new('--version', '--version', [CompletionResultType]::ParameterName, 'Print version')
            break
        }
        'towerctl;status' {
            [CompletionResult]::new('-o', '-o', [CompletionResultType]::ParameterName, 'Output format')
            [CompletionResult]::new('--output', '--output', [CompletionResultType]::ParameterName, 'Output format')
            [CompletionResult]::new('-v', '-v', [CompletionResultType]::ParameterName, 'More logging (-v info, -vv debug), also in the daemons this command starts in the background (up, join, port-forward); RUST_LOG overrides')
            [CompletionResult]::new('--verbose', '--verbose', [CompletionResultType]::ParameterName, 'More logging (-v info, -vv debug), also in the daemons this command starts in the background (up, join, port-forward); RUST_LOG overrides')
            [CompletionResult]::new('-h', '-h', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('--help', '--help', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('-V', '-V ', [CompletionResultType]::ParameterName, 'Print version')
            [CompletionResult]::new('--version', '--version', [CompletionResultType]::ParameterName, 'Print version')
            break
        }
        'towerctl;service' {
            [CompletionResult]::new('-v', '-v', [CompletionResultType]::ParameterName, 'More logging (-v info, -vv debug), also in the daemons this command starts in the background (up, join, port-forward); RUST_LOG overrides')
            [CompletionResult]::new('--verbose', '--verbose', [CompletionResultType]::ParameterName, 'More logging (-v info, -vv debug), also in the daemons this command starts in the background (up, join, port-forward); RUST_LOG overrides')
            [CompletionResult]::new('-h', '-h', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('--help', '--help', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('-V', '-V ', [CompletionResultType]::ParameterName, 'Print version')
            [CompletionResult]::new('--version', '--version', [CompletionResultType]::ParameterName, 'Print version')
            [CompletionResult]::new('install', 'install', [CompletionResultType]::ParameterValue, 'Write a systemd user unit (Type=notify) for the hub or an agent')
            [CompletionResult]::new('help', 'help', [CompletionResultType]::ParameterValue, 'Print this message or the help of the given subcommand(s)')
            break
        }
        'towerctl;service;install' {
            [CompletionResult]::new('-v', '-v', [CompletionResultType]::ParameterName, 'More logging (-v info, -vv debug), also in the daemons this command starts in the background (up, join, port-forward); RUST_LOG overrides')
            [CompletionResult]::new('--verbose', '--verbose', [CompletionResultType]::ParameterName, 'More logging (-v info, -vv debug), also in the daemons this command starts in the background (up, join, port-forward); RUST_LOG overrides')
            [CompletionResult]::new('-h', '-h', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('--help', '--help', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('-V', '-V ', [CompletionResultType]::ParameterName, 'Print version')
            [CompletionResult]::new('--version', '--version', [CompletionResultType]::ParameterName, 'Print version')
            [CompletionResult]::new('hub', 'hub', [CompletionResultType]::ParameterValue, 'The hub, with the same flags as ''towerctl up''')
            [CompletionResult]::new('agent', 'agent', [CompletionResultType]::ParameterValue, 'An agent joined on this machine (''towerctl join'' first)')
            [CompletionResult]::new('help', 'help', [CompletionResultType]::ParameterValue, 'Print this message or the help of the given subcommand(s)')
            break
        }
        'towerctl;service;install;hub' {
            [CompletionResult]::new('--listen', '--listen', [CompletionResultType]::ParameterName, 'Address for agents'' tunnels (WebSocket)')
            [CompletionResult]::new('--gateway', '--gateway', [CompletionResultType]::ParameterName, 'Address for the HTTPS gateway kubectl talks to')
            [CompletionResult]::new('--advertise', '--advertise', [CompletionResultType]::ParameterName, 'Tunnel URL printed in join commands, when agents see the hub under another address (NAT, ingress, wss://)')
            [CompletionResult]::new('--gateway-url', '--gateway-url', [CompletionResultType]::ParameterName, 'Gateway URL written into kubeconfigs, when operators see it under another address (https://HOST[:PORT][/PATH])')
            [CompletionResult]::new('--peer-url', '--peer-url', [CompletionResultType]::ParameterName, 'With etcd: the gateway URL the other hubs forward requests to this hub at (default: --gateway-url, else the gateway''s address). Give each hub its own when --gateway-url names a load balancer in front of several hubs: through it, a request could not reach the hub holding its member''s tunnel')
            [CompletionResult]::new('--tls-san', '--tls-san', [CompletionResultType]::ParameterName, 'Another name or address the gateway''s certificate covers (repeatable): a DNS alias or a load balancer''s IP that operators reach it by besides --gateway-url''s host')
            [CompletionResult]::new('--keepalive', '--keepalive', [CompletionResultType]::ParameterName, 'Keepalive interval (1s to 1h); a peer silent for three intervals is declared dead')
            [CompletionResult]::new('--shutdown-delay', '--shutdown-delay', [CompletionResultType]::ParameterName, 'On SIGTERM (a pod being stopped), answer 503 on /readyz for this long, still serving, before stopping, so that a load balancer or Service stops sending new connections first (`towerctl down` stops at once). Default: none (0s); in the pod manifest 5s, 30s behind a load balancer')
            [CompletionResult]::new('--metrics', '--metrics', [CompletionResultType]::ParameterName, 'Address for Prometheus /metrics (loopback by default), or ''off''')
            [CompletionResult]::new('--store', '--store', [CompletionResultType]::ParameterName, 'Share the registry with other hubs in etcd (etcd://HOST:PORT[,HOST:PORT…], or https://… for TLS); default: the embedded store in the data directory')
            [CompletionResult]::new('--store-prefix', '--store-prefix', [CompletionResultType]::ParameterName, 'Key prefix in etcd, to share one etcd between several hub groups')
            [CompletionResult]::new('--store-max-stale', '--store-max-stale', [CompletionResultType]::ParameterName, 'With etcd: once this hub''s copy of the registry has gone this long without being confirmed current (etcd or its quorum unreachable from it), operators other than this hub''s local admin are refused (503), their streams cut and /readyz answers 503, so that a removal or a narrowed rule made on another hub cannot go unheeded here; at least 3s; ''0'' serves from the copy for as long as etcd is away')
            [CompletionResult]::new('--store-ca', '--store-ca', [CompletionResultType]::ParameterName, 'CA bundle (PEM) that issued etcd''s serving certificate (https:// endpoints; default: the system store)')
            [CompletionResult]::new('--store-cert', '--store-cert', [CompletionResultType]::ParameterName, 'Client certificate (PEM) for an etcd that requires one (--client-cert-auth); with --store-key')
            [CompletionResult]::new('--store-key', '--store-key', [CompletionResultType]::ParameterName, 'The client certificate''s private key (PEM)')
            [CompletionResult]::new('--store-user', '--store-user', [CompletionResultType]::ParameterName, 'User for an etcd with authentication enabled (its role needs readwrite on the keys under --store-prefix); with --store-password-file')
            [CompletionResult]::new('--store-password-file', '--store-password-file', [CompletionResultType]::ParameterName, 'File holding --store-user''s password (its first line; not readable by others), read at start and again at each login to etcd')
            [CompletionResult]::new('--trusted-proxy', '--trusted-proxy', [CompletionResultType]::ParameterName, 'Address or network (CIDR) of an ingress or load balancer in front of the hub; repeatable. Connections from it count as from the client it names: in a PROXY protocol header (v1 or v2) or, for HTTP, the address it appends to X-Forwarded-For')
            [CompletionResult]::new('--require-proxy-protocol', '--require-proxy-protocol', [CompletionResultType]::ParameterName, 'With --trusted-proxy: every connection from those addresses must start with a PROXY protocol header, and X-Forwarded-For is not read. For a layer-4 load balancer that passes its clients'' bytes on untouched: without it, a client could name any address itself')
            [CompletionResult]::new('-v', '-v', [CompletionResultType]::ParameterName, 'More logging (-v info, -vv debug), also in the daemons this command starts in the background (up, join, port-forward); RUST_LOG overrides')
            [CompletionResult]::new('--verbose', '--verbose', [CompletionResultType]::ParameterName, 'More logging (-v info, -vv debug), also in the daemons this command starts in the background (up, join, port-forward); RUST_LOG overrides')
            [CompletionResult]::new('-h', '-h', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('--help', '--help', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('-V', '-V ', [CompletionResultType]::ParameterName, 'Print version')
            [CompletionResult]::new('--version', '--version', [CompletionResultType]::ParameterName, 'Print version')
            break
        }
        'towerctl;service;install;agent' {
            [CompletionResult]::new('-v', '-v', [CompletionResultType]::ParameterName, 'More logging (-v info, -vv debug), also in the daemons this command starts in the background (up, join, port-forward); RUST_LOG overrides')
            [CompletionResult]::new('--verbose', '--verbose', [CompletionResultType]::ParameterName, 'More logging (-v info, -vv debug), also in the daemons this command starts in the background (up, join, port-forward); RUST_LOG overrides')
            [CompletionResult]::new('-h', '-h', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('--help', '--help', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('-V', '-V ', [CompletionResultType]::ParameterName, 'Print version')
            [CompletionResult]::new('--version', '--version', [CompletionResultType]::ParameterName, 'Print version')
            break
        }
        'towerctl;service;install;help' {
            [CompletionResult]::new('hub', 'hub', [CompletionResultType]::ParameterValue, 'The hub, with the same flags as ''towerctl up''')
            [CompletionResult]::new('agent', 'agent', [CompletionResultType]::ParameterValue, 'An agent joined on this machine (''towerctl join'' first)')
            [CompletionResult]::new('help', 'help', [CompletionResultType]::ParameterValue, 'Print this message or the help of the given subcommand(s)')
            break
        }
        'towerctl;service;install;help;hub' {
            break
        }
        'towerctl;service;install;help;agent' {
            break
        }
        'towerctl;service;install;help;help' {
            break
        }
        'towerctl;service;help' {
            [CompletionResult]::new('install', 'install', [CompletionResultType]::ParameterValue, 'Write a systemd user unit (Type=notify) for the hub or an agent')
            [CompletionResult]::new('help', 'help', [CompletionResultType]::ParameterValue, 'Print this message or the help of the given subcommand(s)')
            break
        }
        'towerctl;service;help;install' {
            [CompletionResult]::new('hub', 'hub', [CompletionResultType]::ParameterValue, 'The hub, with the same flags as ''towerctl up''')
            [CompletionResult]::new('agent', 'agent', [CompletionResultType]::ParameterValue, 'An agent joined on this machine (''towerctl join'' first)')
            break
        }
        'towerctl;service;help;install;hub' {
            break
        }
        'towerctl;service;help;install;agent' {
            break
        }
        'towerctl;service;help;help' {
            break
        }
        'towerctl;completion' {
            [CompletionResult]::new('-v', '-v', [CompletionResultType]::ParameterName, 'More logging (-v info, -vv debug), also in the daemons this command starts in the background (up, join, port-forward); RUST_LOG overrides')
            [CompletionResult]::new('--verbose', '--verbose', [CompletionResultType]::ParameterName, 'More logging (-v info, -vv debug), also in the daemons this command starts in the background (up, join, port-forward); RUST_LOG overrides')
            [CompletionResult]::new('-h', '-h', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('--help', '--help', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('-V', '-V ', [CompletionResultType]::ParameterName, 'Print version')
            [CompletionResult]::new('--version', '--version', [CompletionResultType]::ParameterName, 'Print version')
            break
        }
        'towerctl;gen-docs' {
            [CompletionResult]::new('-v', '-v', [CompletionResultType]::ParameterName, 'More logging (-v info, -vv debug), also in the daemons this command starts in the background (up, join, port-forward); RUST_LOG overrides')
            [CompletionResult]::new('--verbose', '--verbose', [CompletionResultType]::ParameterName, 'More logging (-v info, -vv debug), also in the daemons this command starts in the background (up, join, port-forward); RUST_LOG overrides')
            [CompletionResult]::new('-h', '-h', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('--help', '--help', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('-V', '-V ', [CompletionResultType]::ParameterName, 'Print version')
            [CompletionResult]::new('--version', '--version', [CompletionResultType]::ParameterName, 'Print version')
            break
        }
        'towerctl;logs' {
            [CompletionResult]::new('--tail', '--tail', [CompletionResultType]::ParameterName, 'Lines from the end to show first')
            [CompletionResult]::new('-f', '-f', [CompletionResultType]::ParameterName, 'Keep printing new lines')
            [CompletionResult]::new('--follow', '--follow', [CompletionResultType]::ParameterName, 'Keep printing new lines')
            [CompletionResult]::new('-v', '-v', [CompletionResultType]::ParameterName, 'More logging (-v info, -vv debug), also in the daemons this command starts in the background (up, join, port-forward); RUST_LOG overrides')
            [CompletionResult]::new('--verbose', '--verbose', [CompletionResultType]::ParameterName, 'More logging (-v info, -vv debug), also in the daemons this command starts in the background (up, join, port-forward); RUST_LOG overrides')
            [CompletionResult]::new('-h', '-h', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('--help', '--help', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('-V', '-V ', [CompletionResultType]::ParameterName, 'Print version')
            [CompletionResult]::new('--version', '--version', [CompletionResultType]::ParameterName, 'Print version')
            break
        }
        'towerctl;ui' {
            [CompletionResult]::new('--kubeconfig', '--kubeconfig', [CompletionResultType]::ParameterName, 'Kubeconfig file Enter edits (default: KUBECONFIG''s first existing file, or ~/.kube/config)')
            [CompletionResult]::new('-v', '-v', [CompletionResultType]::ParameterName, 'More logging (-v info, -vv debug), also in the daemons this command starts in the background (up, join, port-forward); RUST_LOG overrides')
            [CompletionResult]::new('--verbose', '--verbose', [CompletionResultType]::ParameterName, 'More logging (-v info, -vv debug), also in the daemons this command starts in the background (up, join, port-forward); RUST_LOG overrides')
            [CompletionResult]::new('-h', '-h', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('--help', '--help', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('-V', '-V ', [CompletionResultType]::ParameterName, 'Print version')
            [CompletionResult]::new('--version', '--version', [CompletionResultType]::ParameterName, 'Print version')
            break
        }
        'towerctl;credential' {
            [CompletionResult]::new('--token-file', '--token-file', [CompletionResultType]::ParameterName, 'File holding the operator token (the hub machine''s local admin)')
            [CompletionResult]::new('--gateway', '--gateway', [CompletionResultType]::ParameterName, 'Gateway of a hub logged in to: the token comes from the keyring')
            [CompletionResult]::new('-v', '-v', [CompletionResultType]::ParameterName, 'More logging (-v info, -vv debug), also in the daemons this command starts in the background (up, join, port-forward); RUST_LOG overrides')
            [CompletionResult]::new('--verbose', '--verbose', [CompletionResultType]::ParameterName, 'More logging (-v info, -vv debug), also in the daemons this command starts in the background (up, join, port-forward); RUST_LOG overrides')
            [CompletionResult]::new('-h', '-h', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('--help', '--help', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('-V', '-V ', [CompletionResultType]::ParameterName, 'Print version')
            [CompletionResult]::new('--version', '--version', [CompletionResultType]::ParameterName, 'Print version')
            break
        }
        'towerctl;help' {
            [CompletionResult]::new('up', 'up', [CompletionResultType]::ParameterValue, 'Start the hub in the background and print where it listens')
            [CompletionResult]::new('down', 'down', [CompletionResultType]::ParameterValue, 'Stop the hub started with `towerctl up`')
            [CompletionResult]::new('hub', 'hub', [CompletionResultType]::ParameterValue, 'Hub daemon commands')
            [CompletionResult]::new('cluster', 'cluster', [CompletionResultType]::ParameterValue, 'Manage member clusters on the hub')
            [CompletionResult]::new('join', 'join', [CompletionResultType]::ParameterValue, 'Join this member to a hub: start an agent daemon in the background')
            [CompletionResult]::new('agent', 'agent', [CompletionResultType]::ParameterValue, 'Agent daemon commands')
            [CompletionResult]::new('leave', 'leave', [CompletionResultType]::ParameterValue, 'Stop an agent on this machine and forget its configuration')
            [CompletionResult]::new('use', 'use', [CompletionResultType]::ParameterValue, 'Point kubectl at a member: write the `tower-NAME` context and make it current')
            [CompletionResult]::new('port-forward', 'port-forward', [CompletionResultType]::ParameterValue, 'Forward local ports to a pod, service or deployment in a member (kubectl syntax)')
            [CompletionResult]::new('kubeconfig', 'kubeconfig', [CompletionResultType]::ParameterValue, 'Print a standalone kubeconfig for some (default: all) members')
            [CompletionResult]::new('kubectl', 'kubectl', [CompletionResultType]::ParameterValue, 'Run kubectl against several members at once, with one merged output')
            [CompletionResult]::new('operator', 'operator', [CompletionResultType]::ParameterValue, 'Manage operators (people and tools allowed through the gateway)')
            [CompletionResult]::new('access', 'access', [CompletionResultType]::ParameterValue, 'Which operators may see and reach which members (fail closed: only what a rule allows)')
            [CompletionResult]::new('login', 'login', [CompletionResultType]::ParameterValue, 'Use a hub from this machine with an operator token from ''towerctl operator add''')
            [CompletionResult]::new('logout', 'logout', [CompletionResultType]::ParameterValue, 'Forget a login and its token')
            [CompletionResult]::new('audit', 'audit', [CompletionResultType]::ParameterValue, 'Show the hub''s audit log: who reached which cluster, how, with what result')
            [CompletionResult]::new('status', 'status', [CompletionResultType]::ParameterValue, 'Show the hub, its members and the agents on this machine')
            [CompletionResult]::new('service', 'service', [CompletionResultType]::ParameterValue, 'Install systemd user units for the daemons')
            [CompletionResult]::new('completion', 'completion', [CompletionResultType]::ParameterValue, 'Print a shell completion script (bash, zsh, fish, powershell, elvish)')
            [CompletionResult]::new('gen-docs', 'gen-docs', [CompletionResultType]::ParameterValue, 'Write completions/ and man/ under DIR (for packagers; the checked-in copies come from it)')
            [CompletionResult]::new('logs', 'logs', [CompletionResultType]::ParameterValue, 'Show a daemon''s log: `hub` or an agent''s cluster name')
            [CompletionResult]::new('ui', 'ui', [CompletionResultType]::ParameterValue, 'Live dashboard of the hub''s members and this machine''s agents')
            [CompletionResult]::new('credential', 'credential', [CompletionResultType]::ParameterValue, 'Print an ExecCredential for kubectl (used by kubeconfig entries)')
            [CompletionResult]::new('help', 'help', [CompletionResultType]::ParameterValue, 'Print this message or the help of the given subcommand(s)')
            break
        }
        'towerctl;help;up' {
            break
        }
        'towerctl;help;down' {
            break
        }
        'towerctl;help;hub' {
            [CompletionResult]::new('run', 'run', [CompletionResultType]::ParameterValue, 'Run the hub in the foreground (for containers and systemd)')
            break
        }
        'towerctl;help;hub;run' {
            break
        }
        'towerctl;help;cluster' {
            [CompletionResult]::new('add', 'add', [CompletionResultType]::ParameterValue, 'Register a member and print the join command (the token is shown once)')
            [CompletionResult]::new('set', 'set', [CompletionResultType]::ParameterValue, 'Change a member''s settings')
            [CompletionResult]::new('label', 'label', [CompletionResultType]::ParameterValue, 'Set (KEY=VALUE) or remove (KEY-) labels of a member, like kubectl label')
            [CompletionResult]::new('expose', 'expose', [CompletionResultType]::ParameterValue, 'Change what a member''s workloads may reach on the hub side (push mode)')
            [CompletionResult]::new('rotate', 'rotate', [CompletionResultType]::ParameterValue, 'Issue a new join token; the old one stops working at once')
            [CompletionResult]::new('revoke', 'revoke', [CompletionResultType]::ParameterValue, 'Cut the member''s session now and refuse its agent from now on')
            [CompletionResult]::new('list', 'list', [CompletionResultType]::ParameterValue, 'List registered members with their state, agent version, key and token')
            [CompletionResult]::new('rm', 'rm', [CompletionResultType]::ParameterValue, 'Forget a member: its token and key stop working and its session is cut')
            break
        }
        'towerctl;help;cluster;add' {
            break
        }
        'towerctl;help;cluster;set' {
            break
        }
        'towerctl;help;cluster;label' {
            break
        }
        'towerctl;help;cluster;expose' {
            break
        }
        'towerctl;help;cluster;rotate' {
            break
        }
        'towerctl;help;cluster;revoke' {
            break
        }
        'towerctl;help;cluster;list' {
            break
        }
        'towerctl;help;cluster;rm' {
            break
        }
        'towerctl;help;join' {
            break
        }
        'towerctl;help;agent' {
            [CompletionResult]::new('run', 'run', [CompletionResultType]::ParameterValue, 'Run an agent in the foreground (for containers and systemd)')
            break
        }
        'towerctl;help;agent;run' {
            break
        }
        'towerctl;help;leave' {
            break
        }
        'towerctl;help;use' {
            break
        }
        'towerctl;help;port-forward' {
            break
        }
        'towerctl;help;kubeconfig' {
            break
        }
        'towerctl;help;kubectl' {
            break
        }
        'towerctl;help;operator' {
            [CompletionResult]::new('add', 'add', [CompletionResultType]::ParameterValue, 'Issue an operator token and print the ''towerctl login'' command for it')
            [CompletionResult]::new('list', 'list', [CompletionResultType]::ParameterValue, 'List operators')
            [CompletionResult]::new('rm', 'rm', [CompletionResultType]::ParameterValue, 'Remove an operator; its token stops working at once')
            break
        }
        'towerctl;help;operator;add' {
            break
        }
        'towerctl;help;operator;list' {
            break
        }
        'towerctl;help;operator;rm' {
            break
        }
        'towerctl;help;access' {
            [CompletionResult]::new('allow', 'allow', [CompletionResultType]::ParameterValue, 'Let an operator or group see and reach the selected members')
            [CompletionResult]::new('deny', 'deny', [CompletionResultType]::ParameterValue, 'Refuse an operator or group the selected members (deny wins over allow)')
            [CompletionResult]::new('rm', 'rm', [CompletionResultType]::ParameterValue, 'Remove a rule by its id (open streams it no longer allows are cut)')
            [CompletionResult]::new('list', 'list', [CompletionResultType]::ParameterValue, 'List the rules')
            break
        }
        'towerctl;help;access;allow' {
            break
        }
        'towerctl;help;access;deny' {
            break
        }
        'towerctl;help;access;rm' {
            break
        }
        'towerctl;help;access;list' {
            break
        }
        'towerctl;help;login' {
            break
        }
        'towerctl;help;logout' {
            break
        }
        'towerctl;help;audit' {
            break
        }
        'towerctl;help;status' {
            break
        }
        'towerctl;help;service' {
            [CompletionResult]::new('install', 'install', [CompletionResultType]::ParameterValue, 'Write a systemd user unit (Type=notify) for the hub or an agent')
            break
        }
        'towerctl;help;service;install' {
            [CompletionResult]::new('hub', 'hub', [CompletionResultType]::ParameterValue, 'The hub, with the same flags as ''towerctl up''')
            [CompletionResult]::new('agent', 'agent', [CompletionResultType]::ParameterValue, 'An agent joined on this machine (''towerctl join'' first)')
            break
        }
        'towerctl;help;service;install;hub' {
            break
        }
        'towerctl;help;service;install;agent' {
            break
        }
        'towerctl;help;completion' {
            break
        }
        'towerctl;help;gen-docs' {
            break
        }
        'towerctl;help;logs' {
            break
        }
        'towerctl;help;ui' {
            break
        }
        'towerctl;help;credential' {
            break
        }
        'towerctl;help;help' {
            break
        }
    })

    $completions.Where{ $_.CompletionText -like "$wordToComplete*" } |
        Sort-Object -Property ListItemText
}
