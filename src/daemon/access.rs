//! Which members an operator may see and reach: access rules kept in the
//! registry (`towerctl access allow|deny|rm|list`).
//!
//! Fail closed: an operator reaches a member only when an `allow` rule for
//! it (by name, or one of its groups) selects the member and no `deny`
//! rule does (deny wins). A new operator reaches nothing until allowed.
//! The hub's local admin keeps full access. Members are selected by label
//! selector (`team=payments,env in (dev,staging)`); every member also
//! carries the implicit label [`NAME_LABEL`] (its name), so rules can name
//! members.

use serde::{Deserialize, Serialize};

use super::labels::Selector;
use super::store::Labels;

/// Implicit label holding a member's name (`--names` on the CLI).
pub use super::labels::NAME_LABEL;

/// Where the rules live in the registry's settings.
pub const SETTING: &str = "access";

/// Who a rule is for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Subject {
    Operator(String),
    Group(String),
}

impl std::fmt::Display for Subject {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Subject::Operator(n) => write!(f, "operator:{n}"),
            Subject::Group(n) => write!(f, "group:{n}"),
        }
    }
}

impl Subject {
    /// `operator:NAME` or `group:NAME`.
    /// The name must be one an operator or group can have: a rule naming
    /// `operator:Bob` (names are lower case) would match no one, and a deny
    /// rule that matches no one fails open without a word.
    pub fn parse(s: &str) -> Result<Subject, String> {
        match s.split_once(':') {
            Some(("operator", n)) if !n.is_empty() => {
                crate::daemon::names::validate_name_of("operator", n)?;
                if n == crate::daemon::names::LOCAL_ADMIN {
                    // Rules leave the local admin alone: a deny naming it
                    // would be accepted and change nothing.
                    return Err(format!(
                        "'{s}' is the hub's local admin, which rules do not apply to: it reaches every member; \
                         give other operators their own names and rules"
                    ));
                }
                Ok(Subject::Operator(n.to_string()))
            }
            Some(("group", n)) if !n.is_empty() => match crate::daemon::names::group_problem(n) {
                Some(problem) => Err(problem),
                None => Ok(Subject::Group(n.to_string())),
            },
            _ => Err(format!(
                "invalid subject '{s}': use operator:NAME or group:NAME (like group:payments)"
            )),
        }
    }

    fn covers(&self, operator: &str, groups: &[String]) -> bool {
        match self {
            Subject::Operator(n) => n == operator,
            Subject::Group(g) => groups.iter().any(|x| x == g),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Effect {
    Allow,
    Deny,
}

/// One rule: `allow group:payments team=payments`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rule {
    /// Stable id for `access rm`.
    pub id: u64,
    pub effect: Effect,
    pub subject: Subject,
    /// A label selector over the member's labels plus [`NAME_LABEL`].
    pub clusters: String,
    /// Fields of a rule written by a newer hub (one sharing the registry
    /// in etcd during an upgrade): kept when this hub writes the rules
    /// back, and the rule fails closed here, as one with a selector this
    /// hub cannot read (it may narrow what it allows).
    #[serde(flatten, default, skip_serializing_if = "serde_json::Map::is_empty")]
    pub unknown: serde_json::Map<String, serde_json::Value>,
}

impl std::fmt::Display for Rule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let e = match self.effect {
            Effect::Allow => "allow",
            Effect::Deny => "deny",
        };
        write!(f, "#{} {e} {} '{}'", self.id, self.subject, self.clusters)?;
        if !self.unknown.is_empty() {
            let fields: Vec<&str> = self.unknown.keys().map(String::as_str).collect();
            write!(
                f,
                " (with fields this towerctl does not know, read as failing closed: {})",
                fields.join(", ")
            )?;
        }
        Ok(())
    }
}

/// Every rule of the hub.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    pub rules: Vec<Rule>,
    #[serde(default)]
    pub next_id: u64,
    /// Settings of a newer hub, kept on rewrite; while there are any, no
    /// rule allows anything here (they may restrict what rules allow).
    #[serde(flatten, default, skip_serializing_if = "serde_json::Map::is_empty")]
    pub unknown: serde_json::Map<String, serde_json::Value>,
    /// Why the registry's rules could not be read here (a rule of a shape
    /// a newer hub wrote, a document edited by hand): no rule applies, and
    /// every operator but the local admin is refused until they are read.
    /// Kept in memory only ([`Policy::unreadable`]).
    #[serde(skip)]
    pub unreadable: Option<String>,
}

/// The answer for one operator and member, with the rule that decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    /// `local admin`, a rule (`#3 allow group:payments 'team=payments'`),
    /// or `no rule allows it`.
    pub why: String,
}

impl Policy {
    /// The rules a hub holds when the registry's cannot be read: they
    /// refuse every operator but the local admin, saying why. Keeping the
    /// rules read before instead kept a narrowed grant or a new deny rule
    /// from applying (until `--store-max-stale`, or for ever without it).
    pub fn unreadable(why: impl std::fmt::Display) -> Policy {
        Policy {
            unreadable: Some(crate::tunnel::escape_for_log(&why.to_string(), 300)),
            ..Default::default()
        }
    }

    /// Why no rule applies, for rules that could not be read
    /// ([`Policy::unreadable`]), naming the fixes.
    pub fn unreadable_reason(&self) -> Option<String> {
        self.unreadable.as_ref().map(|why| {
            format!(
                "the access rules in the registry cannot be read by this hub ({why}); until they are, every operator but the local admin is refused: upgrade this hub if a newer one wrote them, or correct the 'settings/access' key under the hub's --store-prefix in etcd (a hub on its own registry is restarted once its rules are fixed)"
            )
        })
    }

    /// Adds a rule after checking its selector; returns it.
    pub fn add(
        &mut self,
        effect: Effect,
        subject: Subject,
        clusters: &str,
    ) -> Result<Rule, String> {
        let selector = Selector::parse(clusters)?;
        // A name no member can have matches nothing: a deny for `Prod`
        // (or `prod.eu`) was taken and denied no one, without a word.
        for r in &selector.0 {
            let values: Vec<&String> = match r {
                crate::daemon::labels::Requirement::Eq(k, v)
                | crate::daemon::labels::Requirement::NotEq(k, v)
                    if k == NAME_LABEL =>
                {
                    vec![v]
                }
                crate::daemon::labels::Requirement::In(k, vs)
                | crate::daemon::labels::Requirement::NotIn(k, vs)
                    if k == NAME_LABEL =>
                {
                    vs.iter().collect()
                }
                _ => continue,
            };
            for v in values {
                if let Err(e) = crate::daemon::names::validate_name(v) {
                    return Err(format!(
                        "'{}' can never name a member, so the rule would match nothing: {e}",
                        crate::tunnel::escape_for_log(v, 80)
                    ));
                }
            }
        }
        // The same rule again (run twice, or on two hubs at once): the one
        // there, nothing added.
        if let Some(same) = self.rules.iter().find(|r| {
            r.effect == effect
                && r.subject == subject
                && r.clusters == clusters
                && r.unknown.is_empty()
        }) {
            return Ok(same.clone());
        }
        self.next_id += 1;
        let r = Rule {
            id: self.next_id,
            effect,
            subject,
            clusters: clusters.to_string(),
            unknown: Default::default(),
        };
        self.rules.push(r.clone());
        Ok(r)
    }

    /// Removes rule `id`; returns it.
    pub fn remove(&mut self, id: u64) -> Option<Rule> {
        let i = self.rules.iter().position(|r| r.id == id)?;
        Some(self.rules.remove(i))
    }

    /// Whether `operator` (with `groups`) may reach member `name` labelled
    /// `labels`. `local_admin` is the hub's own admin (full access).
    pub fn decide(
        &self,
        operator: &str,
        groups: &[String],
        local_admin: bool,
        name: &str,
        labels: &Labels,
    ) -> Decision {
        if local_admin {
            return Decision {
                allowed: true,
                why: "local admin".into(),
            };
        }
        if let Some(why) = self.unreadable_reason() {
            return Decision {
                allowed: false,
                why,
            };
        }
        if !self.unknown.is_empty() {
            let fields: Vec<&str> = self.unknown.keys().map(String::as_str).collect();
            return Decision {
                allowed: false,
                why: format!(
                    "the access rules hold settings this towerctl does not know ({}), written by a newer hub: upgrade this hub",
                    fields.join(", ")
                ),
            };
        }
        let all = super::labels::selectable(labels, name);
        // A selector that does not parse (written by a newer hub, or by
        // hand) fails closed: a deny rule with one denies every member to
        // its subject, an allow rule with one allows none.
        let selects = |r: &Rule| {
            r.subject.covers(operator, groups)
                && if r.unknown.is_empty() {
                    Selector::parse_stored(&r.clusters)
                        .map_or(r.effect == Effect::Deny, |s| s.matches(&all))
                } else {
                    r.effect == Effect::Deny
                }
        };
        if let Some(r) = self
            .rules
            .iter()
            .find(|r| r.effect == Effect::Deny && selects(r))
        {
            return Decision {
                allowed: false,
                why: r.to_string(),
            };
        }
        match self
            .rules
            .iter()
            .find(|r| r.effect == Effect::Allow && selects(r))
        {
            Some(r) => Decision {
                allowed: true,
                why: r.to_string(),
            },
            None => Decision {
                allowed: false,
                why: "no rule allows it".into(),
            },
        }
    }
}

/// `--names a,b` as a selector over [`NAME_LABEL`].
pub fn names_selector(names: &[String]) -> String {
    format!("{NAME_LABEL} in ({})", names.join(","))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        crate::daemon::labels::tests::labels(pairs)
    }

    /// The same rule again is the one there; a different one is added.
    #[test]
    fn the_same_rule_is_not_added_twice() {
        let mut p = Policy::default();
        let a = p
            .add(Effect::Allow, Subject::Group("devs".into()), "env=dev")
            .unwrap();
        let again = p
            .add(Effect::Allow, Subject::Group("devs".into()), "env=dev")
            .unwrap();
        assert_eq!(again.id, a.id);
        assert_eq!(p.rules.len(), 1);
        let deny = p
            .add(Effect::Deny, Subject::Group("devs".into()), "env=dev")
            .unwrap();
        assert_ne!(deny.id, a.id);
        assert_eq!(p.rules.len(), 2);
    }

    #[test]
    fn a_rule_naming_what_no_member_can_be_named_is_refused() {
        let mut p = Policy::default();
        for bad in [
            names_selector(&["Prod".into()]),
            names_selector(&["alpha".into(), "prod.eu".into()]),
            format!("{NAME_LABEL}=Alpha"),
            format!("{NAME_LABEL}!=a_b"),
        ] {
            let e = p
                .add(Effect::Deny, Subject::Group("contractors".into()), &bad)
                .unwrap_err();
            assert!(e.contains("can never name a member"), "{bad}: {e}");
        }
        assert!(p.rules.is_empty());
        p.add(
            Effect::Deny,
            Subject::Group("contractors".into()),
            &names_selector(&["prod".into(), "alpha".into()]),
        )
        .unwrap();
    }

    /// `KEY in ()` is refused in a new rule (it matches nothing: a deny
    /// denied no one, without a word), and a rule stored with one before
    /// reads as it did, not as a selector this hub cannot read (which
    /// would deny its subject everything after an upgrade).
    #[test]
    fn an_empty_value_set_is_refused_new_and_read_as_before_stored() {
        let mut p = Policy::default();
        let e = p
            .add(Effect::Deny, Subject::Group("dev".into()), "env in ()")
            .unwrap_err();
        assert!(e.contains("names no value"), "{e}");
        p.add(Effect::Allow, Subject::Group("dev".into()), "env=dev")
            .unwrap();
        let mut r = p
            .add(Effect::Deny, Subject::Group("dev".into()), "env in (q)")
            .unwrap();
        p.remove(r.id);
        r.clusters = "env in ( )".into();
        p.rules.push(r);
        let g = vec!["dev".to_string()];
        let d = p.decide("op1", &g, false, "a1", &labels(&[("env", "dev")]));
        assert!(d.allowed, "{d:?}");
    }

    #[test]
    fn fails_closed_allows_by_group_and_deny_wins() {
        let mut p = Policy::default();
        let pay = labels(&[("team", "payments"), ("env", "prod")]);
        let g = vec!["payments".to_string()];
        assert!(!p.decide("alice", &g, false, "alpha", &pay).allowed);
        assert!(p.decide("admin", &[], true, "alpha", &pay).allowed);
        let r = p
            .add(
                Effect::Allow,
                Subject::Group("payments".into()),
                "team=payments",
            )
            .unwrap();
        let d = p.decide("alice", &g, false, "alpha", &pay);
        assert!(d.allowed && d.why.contains("group:payments"), "{d:?}");
        assert!(
            !p.decide("bob", &["web".into()], false, "alpha", &pay)
                .allowed
        );
        p.add(Effect::Deny, Subject::Operator("alice".into()), "env=prod")
            .unwrap();
        let d = p.decide("alice", &g, false, "alpha", &pay);
        assert!(!d.allowed && d.why.contains("deny operator:alice"), "{d:?}");
        assert!(p.remove(r.id).is_some() && p.remove(r.id).is_none());
        assert!(p
            .add(Effect::Allow, Subject::Group("x".into()), "in (")
            .is_err());
    }

    #[test]
    fn names_select_members() {
        let mut p = Policy::default();
        let sel = names_selector(&["alpha".into(), "beta".into()]);
        p.add(Effect::Allow, Subject::Operator("bob".into()), &sel)
            .unwrap();
        let none = Labels::new();
        assert!(p.decide("bob", &[], false, "beta", &none).allowed);
        assert!(!p.decide("bob", &[], false, "gamma", &none).allowed);
        assert_eq!(
            Subject::parse("group:payments").unwrap(),
            Subject::Group("payments".into())
        );
        assert!(Subject::parse("payments").is_err());
    }

    #[test]
    fn subjects_no_operator_or_group_could_have_are_refused() {
        let e = Subject::parse("operator:Bob").unwrap_err();
        assert!(e.contains("invalid operator name 'Bob'"), "{e}");
        assert!(Subject::parse("group:dev,ops").unwrap_err().contains("','"));
        assert!(Subject::parse("group:system:masters").is_ok());
        assert!(Subject::parse("operator:bob-2").is_ok());
        // Rules do not apply to the local admin: naming it changes nothing.
        let e = Subject::parse("operator:admin").unwrap_err();
        assert!(e.contains("local admin"), "{e}");
    }

    /// Rules are read back from the registry, where a newer hub (or a hand)
    /// may have written a selector this one cannot parse: such a deny rule
    /// used to be skipped, so what it was meant to deny was allowed.
    #[test]
    fn a_selector_that_does_not_parse_fails_closed() {
        let mut p = Policy::default();
        let sel = names_selector(&["alpha".into()]);
        p.add(Effect::Allow, Subject::Operator("alice".into()), &sel)
            .unwrap();
        p.add(Effect::Allow, Subject::Operator("bob".into()), &sel)
            .unwrap();
        let none = Labels::new();
        assert!(p.decide("alice", &[], false, "alpha", &none).allowed);
        let unreadable = |effect, who: &str| Rule {
            id: 99,
            effect,
            subject: Subject::Operator(who.into()),
            clusters: "env in (prod".into(),
            unknown: Default::default(),
        };
        p.rules.push(unreadable(Effect::Deny, "alice"));
        let d = p.decide("alice", &[], false, "alpha", &none);
        assert!(!d.allowed && d.why.contains("#99 deny"), "{d:?}");
        // Not for others; an allow rule that cannot be read allows nothing.
        assert!(p.decide("bob", &[], false, "alpha", &none).allowed);
        p.rules.push(unreadable(Effect::Allow, "carol"));
        assert!(!p.decide("carol", &[], false, "alpha", &none).allowed);
    }

    /// A rule or setting a newer hub wrote (hubs of several versions share
    /// one etcd during an upgrade) is not read as if its new fields were
    /// not there: the rule fails closed, as an unreadable selector does,
    /// and the fields survive this hub writing the rules back (they used
    /// to be dropped, for every hub).
    #[test]
    fn fields_of_a_newer_hub_fail_closed_and_are_kept() {
        let newer = r#"{"rules":[
            {"id":7,"effect":"allow","subject":{"group":"dev"},"clusters":"env=dev","namespaces":["team-a"]},
            {"id":8,"effect":"allow","subject":{"group":"ops"},"clusters":"env=dev"}
        ],"next_id":8}"#;
        let mut p: Policy = serde_json::from_str(newer).unwrap();
        let dev: Labels = [("env".to_string(), "dev".to_string())].into();
        let d = p.decide("x", &["dev".into()], false, "alpha", &dev);
        assert!(!d.allowed, "{d:?}");
        assert!(p.decide("y", &["ops".into()], false, "alpha", &dev).allowed);
        p.add(Effect::Allow, Subject::Group("qa".into()), "env=dev")
            .unwrap();
        let back = serde_json::to_value(&p).unwrap();
        assert_eq!(back["rules"][0]["namespaces"][0], "team-a", "{back}");
        assert!(back["rules"][1].get("namespaces").is_none());
        assert!(p.rules[0].to_string().contains("namespaces"));
        // A policy-wide setting: nothing allowed but to the local admin.
        let mut p: Policy = serde_json::from_value(serde_json::json!({
            "rules": back["rules"], "next_id": 9, "defaultNamespaces": ["x"]
        }))
        .unwrap();
        let d = p.decide("y", &["ops".into()], false, "alpha", &dev);
        assert!(!d.allowed && d.why.contains("defaultNamespaces"), "{d:?}");
        assert!(p.decide("admin", &[], true, "alpha", &dev).allowed);
        p.remove(9);
        assert_eq!(
            serde_json::to_value(&p).unwrap()["defaultNamespaces"][0],
            "x"
        );
    }
}
