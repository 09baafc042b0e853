//! `towerctl credential`: the kubectl exec credential plugin. Kubeconfig
//! entries written by `towerctl use` call it, so no token sits in the
//! kubeconfig itself.

use std::path::Path;

use anyhow::{bail, Context, Result};

use super::{exit, operator};

pub fn run(token_file: Option<&Path>, gateway: Option<&str>) -> Result<u8> {
    let token = match (token_file, gateway) {
        (Some(f), _) => std::fs::read_to_string(f)
            .with_context(|| format!("cannot read the operator token '{}': is the hub installed on this machine? Run 'towerctl use CLUSTER' again", f.display()))?
            .trim()
            .to_string(),
        (None, Some(g)) => {
            let login = operator::find_login(Some(g))?
                .with_context(|| format!("not logged in to '{g}': run the login command 'towerctl operator add' printed on the hub (' TOWERCTL_OPERATOR_TOKEN=… towerctl login {g} --ca-hash …')"))?;
            operator::login_token(&login)?
        }
        (None, None) => bail!("towerctl credential needs --token-file or --gateway (it is called by kubectl through kubeconfig entries written by 'towerctl use')"),
    };
    if token.is_empty() {
        bail!("the operator token is empty; run 'towerctl login' or 'towerctl use CLUSTER' again");
    }
    let cred = serde_json::json!({
        "apiVersion": "client.authentication.k8s.io/v1",
        "kind": "ExecCredential",
        "status": { "token": token },
    });
    println!("{cred}");
    Ok(exit::OK)
}
