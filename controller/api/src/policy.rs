//! The egress policy JSON: `{"defaultAction":"deny","egress":[{"action":"allow","target":"*.pypi.org"}]}`.
//! Targets are exact names, `*.suffix` wildcards, IP addresses or CIDRs.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Allow,
    Deny,
}

/// Actions are read as the reference reads them: trimmed, any case, empty meaning `deny`;
/// anything else is an error (an unknown action is never taken as `allow`).
impl<'de> Deserialize<'de> for Action {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        match text.trim().to_ascii_lowercase().as_str() {
            "allow" => Ok(Action::Allow),
            "deny" | "" => Ok(Action::Deny),
            _ => Err(serde::de::Error::custom(format_args!(
                "unsupported action {text:?} (expected \"allow\" or \"deny\")"
            ))),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rule {
    pub action: Action,
    pub target: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Policy {
    #[serde(default = "deny")]
    pub default_action: Action,
    #[serde(default)]
    pub egress: Vec<Rule>,
}

fn deny() -> Action {
    Action::Deny
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    #[error("invalid policy JSON: {0}")]
    Json(String),
    #[error("rule {index}: invalid target {target:?}: {reason}")]
    Target {
        index: usize,
        target: String,
        reason: &'static str,
    },
}

/// Parses and validates a policy; unknown actions (including `defaultAction`) are errors.
pub fn parse(text: &str) -> Result<Policy, PolicyError> {
    let policy: Policy =
        serde_json::from_str(text).map_err(|e| PolicyError::Json(e.to_string()))?;
    validate(&policy)?;
    Ok(policy)
}

/// Checks every rule's target (a policy built in memory, e.g. by merging rules).
pub fn validate(policy: &Policy) -> Result<(), PolicyError> {
    for (index, rule) in policy.egress.iter().enumerate() {
        validate_target(&rule.target).map_err(|reason| PolicyError::Target {
            index,
            target: rule.target.clone(),
            reason,
        })?;
    }
    Ok(())
}

pub fn validate_target(target: &str) -> Result<(), &'static str> {
    let t = target.trim().trim_end_matches('.');
    if t.is_empty() {
        return Err("empty target");
    }
    if t.parse::<IpAddr>().is_ok() {
        return Ok(());
    }
    if t.contains('/') {
        return match t.parse::<crate::net::Cidr>() {
            Ok(_) => Ok(()),
            Err(crate::net::CidrError::Prefix(_)) => Err("invalid CIDR prefix length"),
            Err(_) => Err("not a CIDR"),
        };
    }
    let name = t.strip_prefix("*.").unwrap_or(t);
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    };
    if name.len() > 253 || !name.split('.').all(label_ok) {
        return Err("not a domain name, *.suffix, IP address or CIDR");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_validates() {
        let p = parse(r#"{"defaultAction":"deny","egress":[{"action":"allow","target":"*.pypi.org"},{"action":"deny","target":"10.0.0.0/8"},{"action":"allow","target":"example.com."}]}"#).unwrap();
        assert_eq!(p.default_action, Action::Deny);
        assert_eq!(p.egress.len(), 3);
        assert_eq!(parse("{}").unwrap().default_action, Action::Deny);
        assert!(matches!(
            parse(r#"{"defaultAction":"maybe"}"#),
            Err(PolicyError::Json(_))
        ));
        assert!(matches!(parse("not json"), Err(PolicyError::Json(_))));
        assert!(matches!(
            parse(r#"{"egress":[{"action":"allow","target":"bad name!"}]}"#),
            Err(PolicyError::Target { index: 0, .. })
        ));
        assert!(matches!(
            parse(r#"{"egress":[{"action":"allow","target":"10.0.0.0/40"}]}"#),
            Err(PolicyError::Target { .. })
        ));
        assert!(matches!(
            parse(r#"{"egress":[{"action":"permit","target":"a.b"}]}"#),
            Err(PolicyError::Json(_))
        ));
        let p = parse(r#"{"defaultAction":" ALLOW ","egress":[{"action":"","target":"a.b"}]}"#)
            .unwrap();
        assert_eq!(p.default_action, Action::Allow);
        assert_eq!(p.egress[0].action, Action::Deny, "empty action means deny");
        let e = parse(r#"{"defaultAction":"allwo"}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("unsupported action \"allwo\""), "{e}");
    }
}
