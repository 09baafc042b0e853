//! `towerctl access allow|deny|rm|list`: which operators may see and
//! reach which members (rules on the hub; see `daemon/access.rs`).

use anyhow::{bail, Context, Result};

use super::exit;
use super::hub::hub_call;
use crate::daemon::access::{names_selector, Effect, Rule};
use crate::daemon::control::Request;

/// `allow`/`deny SUBJECT (--clusters SELECTOR | --names A,B)`.
pub async fn add(
    effect: Effect,
    subject: &str,
    clusters: Option<&str>,
    names: &[String],
) -> Result<u8> {
    let clusters = match (clusters, names.is_empty()) {
        (Some(c), true) => c.to_string(),
        (None, false) => names_selector(names),
        (Some(_), false) => bail!("give --clusters or --names, not both"),
        (None, true) => bail!(
            "say which members: --clusters SELECTOR (like 'team=payments,env in (dev,staging)') or --names alpha,beta"
        ),
    };
    let v = hub_call(Request::AccessAdd {
        effect,
        subject: subject.to_string(),
        clusters,
    })
    .await?;
    report("added", &v)
}

pub async fn remove(id: u64) -> Result<u8> {
    let v = hub_call(Request::AccessRemove { id }).await?;
    report("removed", &v)
}

/// Prints the hub's answer to a rule change: the rule, and the streams cut.
fn report(what: &str, v: &serde_json::Value) -> Result<u8> {
    let rule: Rule =
        serde_json::from_value(v["rule"].clone()).context("malformed answer from the hub")?;
    // The same rule was there: nothing added.
    let what = if v["unchanged"].as_bool() == Some(true) {
        "exists already:"
    } else {
        what
    };
    println!("{what} {}", crate::tunnel::shown(&rule.to_string()));
    let cut = v["streamsCut"].as_u64().unwrap_or(0);
    if cut > 0 {
        eprintln!("{cut} open streams no longer allowed were cut");
    }
    Ok(exit::OK)
}

pub async fn list(output: &str) -> Result<u8> {
    let v = hub_call(Request::AccessList).await?;
    let rules: Vec<Rule> = serde_json::from_value(v).context("malformed answer from the hub")?;
    if output == "json" {
        println!("{}", serde_json::to_string_pretty(&rules)?);
        return Ok(exit::OK);
    }
    if rules.is_empty() {
        eprintln!("no access rules: operators other than the local admin reach no member (allow some with 'towerctl access allow group:NAME --clusters SELECTOR')");
        return Ok(exit::OK);
    }
    println!("{:<5} {:<7} {:<28} CLUSTERS", "ID", "EFFECT", "SUBJECT");
    for r in rules {
        let e = match r.effect {
            Effect::Allow => "allow",
            Effect::Deny => "deny",
        };
        // A rule with fields a newer hub wrote fails closed here: shown so.
        let unknown = if r.unknown.is_empty() {
            String::new()
        } else {
            let fields: Vec<&str> = r.unknown.keys().map(String::as_str).collect();
            format!(
                "  (fails closed on this hub: fields it does not know: {})",
                crate::tunnel::shown(&fields.join(", "))
            )
        };
        // Registry text (a rule written to etcd by hand need not parse as
        // one `access` accepts): escaped, so that no rule can hide another
        // line of this list.
        println!(
            "{:<5} {:<7} {:<28} {}{unknown}",
            r.id,
            e,
            crate::tunnel::shown(&r.subject.to_string()),
            crate::tunnel::shown(&r.clusters.to_string())
        );
    }
    Ok(exit::OK)
}
