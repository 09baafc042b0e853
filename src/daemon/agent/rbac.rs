//! Raw access under impersonation obeys the member's RBAC: before an
//! impersonating agent dials a pod, service or deployment for a CONNECT or
//! port-forward, it asks its API server with a `SubjectAccessReview`
//! whether the operator could do the same with kubectl — `get` on the
//! service or deployment used to find the pod, `create pods/portforward`
//! on the pod. Answers are cached for [`TTL`] per operator and question.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};
use kube::api::{Api, PostParams};

use crate::daemon::wire::RawIdentity;

/// How long an answer is reused.
pub const TTL: Duration = Duration::from_secs(10);

/// One question: may the operator `verb` `resource[/subresource]` `name`
/// in `namespace`?
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Ask {
    pub verb: &'static str,
    pub group: &'static str,
    pub resource: &'static str,
    pub subresource: Option<&'static str>,
    pub namespace: String,
    pub name: String,
}

impl Ask {
    fn describe(&self) -> String {
        let res = match self.subresource {
            Some(s) => format!("{}/{s}", self.resource),
            None => self.resource.to_string(),
        };
        format!(
            "{} {res} '{}' in namespace '{}'",
            self.verb, self.name, self.namespace
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
type Answer = (Instant, Result<(), String>);

/// The agent's SubjectAccessReview client and its cache.
pub struct Rbac {
    client: kube::Client,
    cache: Mutex<HashMap<Key, Answer>>,
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
            if let Some((at, r)) = c.get(&key) {
                if at.elapsed() < TTL {
                    return r.clone();
                }
            }
        }
        let r = self.review(who, ask).await;
        if let Ok(mut c) = self.cache.lock() {
            c.retain(|_, (at, _)| at.elapsed() < TTL);
            c.insert(key, (Instant::now(), r.clone()));
        }
        r
    }

    async fn review(&self, who: &RawIdentity, ask: &Ask) -> Result<(), String> {
        let sar = SubjectAccessReview {
            spec: SubjectAccessReviewSpec {
                user: Some(who.user.clone()),
                groups: Some(who.groups.clone()),
                resource_attributes: Some(ResourceAttributes {
                    verb: Some(ask.verb.to_string()),
                    group: Some(ask.group.to_string()),
                    resource: Some(ask.resource.to_string()),
                    subresource: ask.subresource.map(str::to_string),
                    namespace: Some(ask.namespace.clone()),
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
                    "the member could not check whether operator '{}' may {} (SubjectAccessReview failed: {e}); the agent needs 'create subjectaccessreviews' in its RBAC",
                    crate::tunnel::printable(&who.user, 100),
                    ask.describe()
                )
            })?;
        let status = answer.status.unwrap_or_default();
        if status.allowed && status.denied != Some(true) {
            return Ok(());
        }
        Err(refusal(&who.user, ask, status.reason.as_deref()))
    }
}

#[cfg(test)]
mod tests {
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
