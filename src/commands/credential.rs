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
        bail!("the operator token is empty; run the login command again (the admin who ran 'towerctl operator add' gave it)");
    }
    let info = std::env::var("KUBERNETES_EXEC_INFO").ok();
    let cred = serde_json::json!({
        "apiVersion": answer_version(info.as_deref()),
        "kind": "ExecCredential",
        "status": { "token": token },
    });
    println!("{cred}");
    Ok(exit::OK)
}

/// The `ExecCredential` version to answer in: the one the client asked for
/// in `KUBERNETES_EXEC_INFO` when it is one we know (clients such as the
/// official Python one refuse an answer in another version than their
/// kubeconfig entry names, and older Java clients know `v1beta1` only, so
/// an operator may set the entry to it), else `v1`, which `towerctl use`
/// writes. The status holds a token alone, the same in all three.
fn answer_version(exec_info: Option<&str>) -> &'static str {
    const KNOWN: [&str; 3] = [
        "client.authentication.k8s.io/v1",
        "client.authentication.k8s.io/v1beta1",
        "client.authentication.k8s.io/v1alpha1",
    ];
    let asked = exec_info
        .and_then(|s| serde_json::from_str::<serde_json::Value>(s).ok())
        .and_then(|v| v.get("apiVersion")?.as_str().map(str::to_string));
    KNOWN
        .into_iter()
        .find(|k| asked.as_deref() == Some(*k))
        .unwrap_or(KNOWN[0])
}

#[cfg(test)]
mod tests {
    use super::answer_version;

    #[test]
    fn the_answer_is_in_the_version_the_client_asked_for() {
        let beta = r#"{"apiVersion":"client.authentication.k8s.io/v1beta1","kind":"ExecCredential","spec":{"interactive":false}}"#;
        assert_eq!(
            answer_version(Some(beta)),
            "client.authentication.k8s.io/v1beta1"
        );
        let v1 = r#"{"apiVersion":"client.authentication.k8s.io/v1","kind":"ExecCredential","spec":{"interactive":false}}"#;
        assert_eq!(answer_version(Some(v1)), "client.authentication.k8s.io/v1");
        for other in [
            None,
            Some(""),
            Some("not json"),
            Some(r#"{"apiVersion":"x/v9"}"#),
        ] {
            assert_eq!(
                answer_version(other),
                "client.authentication.k8s.io/v1",
                "{other:?}"
            );
        }
    }
}
