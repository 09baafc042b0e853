//! Raw access under impersonation obeys the member's RBAC: before an
//! impersonating agent dials a pod, service or deployment for a CONNECT or
//! port-forward, it asks its API server with a `SubjectAccessReview`
//! whether the operator could do the same with kubectl — `get` on the
//! service or deployment used to find the pod, `create pods/portforward`
//! on the pod. Allowances are cached for [`TTL`] per operator and
//! question; refusals are asked again (a binding just made counts at once,
//! as it does with kubectl).
//! A client's own impersonation (`kubectl --as`) under an impersonating
//! agent is checked the same way, as kube-apiserver checks it for a
//! direct client: `impersonate` on each user (or service account), group,
//! UID and extra value asked for ([`Rbac::may_impersonate`]).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};
use kube::api::{Api, PostParams};

use crate::daemon::clientas::{unescape_key, ClientAs};
use crate::daemon::wire::RawIdentity;

/// How long an answer is reused.
pub const TTL: Duration = Duration::from_secs(10);

/// Most allowances kept: past it the cache starts over (distinct questions,
/// each a SubjectAccessReview, within one [`TTL`]).
const MAX_CACHED: usize = 4096;

/// One question: may the operator `verb` `resource[/subresource]` `name`
/// in `namespace`?
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Ask {
    pub verb: &'static str,
    pub group: &'static str,
    pub resource: &'static str,
    pub subresource: Option<String>,
    /// Empty for cluster-wide resources (users, groups).
    pub namespace: String,
    pub name: String,
}

impl Ask {
    fn describe(&self) -> String {
        let res = match &self.subresource {
            Some(s) => format!("{}/{}", self.resource, crate::tunnel::printable(s, 100)),
            None => self.resource.to_string(),
        };
        let name = crate::tunnel::printable(&self.name, 200);
        if self.namespace.is_empty() {
            return format!("{} {res} '{name}'", self.verb);
        }
        format!(
            "{} {res} '{name}' in namespace '{}'",
            self.verb,
            crate::tunnel::printable(&self.namespace, 100)
        )
    }
}

/// A refusal in words. The operator's name is the hub's word and the
/// reason the API server's: both plain text, bounded, before they reach the
/// agent's log or the operator's terminal.
fn refusal(user: &str, ask: &Ask, reason: Option<&str>) -> String {
    let reason = reason
        .filter(|r| !r.is_empty())
        .map(|r| format!(": {}", crate::tunnel::printable(r, 500)))
        .unwrap_or_default();
    format!(
        "the member's RBAC does not let operator '{}' {}{reason}",
        crate::tunnel::printable(user, 100),
        ask.describe()
    )
}

type Key = (String, Vec<String>, Ask);

/// The agent's SubjectAccessReview client and its cache of allowances
/// (when each was given).
pub struct Rbac {
    client: kube::Client,
    cache: Mutex<HashMap<Key, Instant>>,
}

impl Rbac {
    pub fn new(client: kube::Client) -> Rbac {
        Rbac {
            client,
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// `Ok` when the member's RBAC allows `who` to do `ask`; otherwise the
    /// member's answer in words.
    pub async fn check(&self, who: &RawIdentity, ask: &Ask) -> Result<(), String> {
        let key: Key = (who.user.clone(), who.groups.clone(), ask.clone());
        if let Ok(c) = self.cache.lock() {
            if let Some(at) = c.get(&key) {
                if at.elapsed() < TTL {
                    return Ok(());
                }
            }
        }
        self.review(who, ask).await?;
        if let Ok(mut c) = self.cache.lock() {
            c.retain(|_, at| at.elapsed() < TTL);
            // Full of live answers: the oldest goes (clearing all would let
            // one operator's many questions cost everyone theirs).
            if c.len() >= MAX_CACHED {
                if let Some(oldest) = c.iter().min_by_key(|(_, at)| **at).map(|(k, _)| k.clone()) {
                    c.remove(&oldest);
                }
            }
            c.insert(key, Instant::now());
        }
        Ok(())
    }

    /// `Ok` when the member's RBAC lets `who` impersonate everything `a`
    /// names; otherwise the first refusal in words.
    pub async fn may_impersonate(&self, who: &RawIdentity, a: &ClientAs) -> Result<(), String> {
        for ask in impersonation_asks(a) {
            self.check(who, &ask).await?;
        }
        Ok(())
    }

    async fn review(&self, who: &RawIdentity, ask: &Ask) -> Result<(), String> {
        let sar = SubjectAccessReview {
            spec: SubjectAccessReviewSpec {
                user: Some(who.user.clone()),
                groups: Some(with_authenticated(&who.groups)),
                resource_attributes: Some(ResourceAttributes {
                    verb: Some(ask.verb.to_string()),
                    group: Some(ask.group.to_string()),
                    resource: Some(ask.resource.to_string()),
                    subresource: ask.subresource.clone(),
                    namespace: (!ask.namespace.is_empty()).then(|| ask.namespace.clone()),
                    name: Some(ask.name.clone()),
                    ..ResourceAttributes::default()
                }),
                ..SubjectAccessReviewSpec::default()
            },
            ..SubjectAccessReview::default()
        };
        let api = Api::<SubjectAccessReview>::all(self.client.clone());
        let answer = api
            .create(&PostParams::default(), &sar)
            .await
            .map_err(|e| {
                format!(
                    "the member could not check whether operator '{}' may {} (SubjectAccessReview failed: {}); the agent needs 'create subjectaccessreviews' in its RBAC",
                    crate::tunnel::printable(&who.user, 100),
                    ask.describe(),
                    crate::tunnel::printable(&e.to_string(), 500)
                )
            })?;
        let status = answer.status.unwrap_or_default();
        if status.allowed && status.denied != Some(true) {
            return Ok(());
        }
        Err(refusal(&who.user, ask, status.reason.as_deref()))
    }
}

/// The groups kube-apiserver gives a user the agent impersonates: those
/// the hub named, and `system:authenticated` (added by its impersonation
/// filter), so that a binding to it counts here as it does for kubectl.
fn with_authenticated(groups: &[String]) -> Vec<String> {
    let mut g = groups.to_vec();
    if !g.iter().any(|g| g == "system:authenticated") {
        g.push("system:authenticated".to_string());
    }
    g
}

/// The questions kube-apiserver asks before it lets a client act as `a`
/// (its impersonation filter): `impersonate` on the user (a service
/// account's user name: on that service account in its namespace), on
/// each group, on the UID and on each extra value
/// (`authentication.k8s.io`, `uids`, `userextras/KEY`).
pub fn impersonation_asks(a: &ClientAs) -> Vec<Ask> {
    let ask =
        |group: &'static str, resource: &'static str, sub: Option<String>, ns: &str, name: &str| {
            Ask {
                verb: "impersonate",
                group,
                resource,
                subresource: sub,
                namespace: ns.to_string(),
                name: name.to_string(),
            }
        };
    let mut asks = vec![match a.service_account() {
        Some((ns, name)) => ask("", "serviceaccounts", None, ns, name),
        None => ask("", "users", None, "", &a.user),
    }];
    asks.extend(a.groups.iter().map(|g| ask("", "groups", None, "", g)));
    if let Some(uid) = &a.uid {
        asks.push(ask("authentication.k8s.io", "uids", None, "", uid));
    }
    for (key, values) in &a.extra {
        // Refused at the gateway when it does not unescape.
        let key = unescape_key(key).unwrap_or_else(|| key.clone());
        asks.extend(values.iter().map(|v| {
            ask(
                "authentication.k8s.io",
                "userextras",
                Some(key.clone()),
                "",
                v,
            )
        }));
    }
    asks
}

#[cfg(test)]
mod tests {
    #[test]
    fn impersonation_is_asked_about_as_kube_apiserver_asks() {
        let a = crate::daemon::clientas::ClientAs {
            user: "system:serviceaccount:flux:reconciler".into(),
            groups: vec!["devs".into()],
            uid: Some("42".into()),
            extra: vec![("example.com%2Fscopes".into(), vec!["a".into(), "b".into()])],
        };
        let asks: Vec<String> = super::impersonation_asks(&a)
            .iter()
            .map(|a| format!("{}|{}|{}", a.group, a.describe(), a.namespace))
            .collect();
        assert_eq!(
            asks,
            [
                "|impersonate serviceaccounts 'reconciler' in namespace 'flux'|flux",
                "|impersonate groups 'devs'|",
                "authentication.k8s.io|impersonate uids '42'|",
                "authentication.k8s.io|impersonate userextras/example.com/scopes 'a'|",
                "authentication.k8s.io|impersonate userextras/example.com/scopes 'b'|",
            ]
        );
        let user = crate::daemon::clientas::ClientAs {
            user: "bob".into(),
            ..Default::default()
        };
        let asks = super::impersonation_asks(&user);
        assert_eq!(asks.len(), 1);
        assert_eq!(
            (asks[0].resource, asks[0].describe()),
            ("users", "impersonate users 'bob'".to_string())
        );
    }

    #[test]
    fn a_refusal_names_the_operator_in_plain_text() {
        let ask = super::Ask {
            verb: "get",
            group: "",
            resource: "services",
            subresource: None,
            namespace: "prod".into(),
            name: "db".into(),
        };
        let hostile = format!("eve\x1b]0;owned\x07\nFAKE LOG LINE{}", "x".repeat(10_000));
        let m = super::refusal(&hostile, &ask, Some("no rule\r\nallows it"));
        assert!(!m.chars().any(char::is_control), "{m:?}");
        assert!(m.len() < 1_000, "{} bytes", m.len());
        assert!(m.contains("operator 'eve ]0;owned  FAKE LOG LINE"), "{m}");
        assert!(
            m.ends_with("get services 'db' in namespace 'prod': no rule  allows it"),
            "{m}"
        );
        assert_eq!(
            super::refusal("alice", &ask, Some("")),
            "the member's RBAC does not let operator 'alice' get services 'db' in namespace 'prod'"
        );
    }
}
