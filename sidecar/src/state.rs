//! The policy in force: the user policy (from env, file or API) and the always-rule files,
//! compiled into an [`Engine`] that DNS lookups read without locking. Changes are serialized;
//! each one is persisted, pushed to nftables, then made visible to DNS, and audited.

use std::collections::HashSet;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;
use sandbox_api::policy::{Action, Policy, Rule};
use tokio::sync::Mutex;

use crate::always::AlwaysRules;
use crate::config::{Config, Mode};
use crate::engine::{Engine, parse_net};
use crate::metrics;
use crate::nft::{Nft, NftError, StaticSpec};

/// The `mode` field of the API: what the user policy amounts to.
pub fn mode_name(policy: &Policy) -> &'static str {
    match (policy.default_action, policy.egress.is_empty()) {
        (Action::Allow, true) => "allow_all",
        (Action::Deny, true) => "deny_all",
        _ => "enforcing",
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CommitError {
    #[error("failed to persist policy: {0}")]
    Persist(std::io::Error),
    #[error("failed to apply nftables policy: {0}")]
    Nft(#[from] NftError),
}

struct Inner {
    policy: Policy,
    always: AlwaysRules,
}

pub struct State {
    engine: ArcSwap<Engine>,
    inner: Mutex<Inner>,
    pub mode: Mode,
    pub max_rules: usize,
    policy_file: Option<PathBuf>,
    nft: Option<Nft>,
    spec_base: StaticSpec,
    /// Bumped on every change; the DNS cache drops answers from older generations.
    generation: std::sync::atomic::AtomicU64,
}

/// Audit line for a change: what was added and removed, by target.
fn audit(source: &str, scope: &str, before: &[Rule], after: &[Rule], default: Action) {
    let key = |r: &Rule| format!("{}:{}", action_str(r.action), r.target);
    let old: HashSet<String> = before.iter().map(key).collect();
    let new: HashSet<String> = after.iter().map(key).collect();
    let added: Vec<&String> = new.iter().filter(|k| !old.contains(*k)).collect();
    let removed: Vec<&String> = old.iter().filter(|k| !new.contains(*k)).collect();
    tracing::info!(
        target: "audit",
        event = "policy.changed",
        source,
        scope,
        default_action = action_str(default),
        rules = after.len(),
        added = ?added,
        removed = ?removed,
        "egress policy changed"
    );
}

pub fn action_str(a: Action) -> &'static str {
    match a {
        Action::Allow => "allow",
        Action::Deny => "deny",
    }
}

fn always_rules(targets: &[String], action: Action) -> Vec<Rule> {
    targets
        .iter()
        .map(|t| Rule {
            action,
            target: t.clone(),
        })
        .collect()
}

/// Writes `policy` to `path` atomically: a temporary file in the same directory, fsynced, then
/// renamed over the old one, then the directory fsynced.
pub fn persist(path: &Path, policy: &Policy) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
    let dir = dir.unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "policy".into());
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let mut text = serde_json::to_vec_pretty(policy).map_err(std::io::Error::other)?;
    text.push(b'\n');
    let result = (|| {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        file.write_all(&text)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

impl State {
    /// Builds the state and, with nftables, takes the table over. `nft` is `None` only in unit
    /// tests.
    pub async fn start(
        config: &Config,
        always: AlwaysRules,
        nft: Option<Nft>,
    ) -> Result<Arc<State>, NftError> {
        let engine = Engine::new(&config.policy, &always.deny, &always.allow);
        let spec_base = StaticSpec {
            mode: config.mode,
            dns_port: config.dns_listen.port(),
            ip_rules: Vec::new(),
            default_action: Action::Deny,
            redirect_exempt: config.nameserver_exempt.clone(),
            block_doh_443: config.block_doh_443,
            doh_blocklist: config.doh_blocklist.clone(),
        };
        let state = Arc::new(State {
            engine: ArcSwap::from_pointee(engine),
            inner: Mutex::new(Inner {
                policy: config.policy.clone(),
                always,
            }),
            mode: config.mode,
            max_rules: config.max_rules,
            policy_file: config.policy_file.clone(),
            nft,
            spec_base,
            generation: 0.into(),
        });
        {
            let inner = state.inner.lock().await;
            state.apply_nft(&inner, state.engine.load_full()).await?;
            metrics::RULES.set(rule_count(&inner) as i64);
            audit(
                config.policy_source.as_str(),
                "policy",
                &[],
                &inner.policy.egress,
                inner.policy.default_action,
            );
            for (targets, action, file) in [
                (&inner.always.deny, Action::Deny, "deny.always"),
                (&inner.always.allow, Action::Allow, "allow.always"),
            ] {
                if !targets.is_empty() {
                    audit(
                        "always-file",
                        file,
                        &[],
                        &always_rules(targets, action),
                        action,
                    );
                }
            }
        }
        Ok(state)
    }

    pub fn engine(&self) -> arc_swap::Guard<Arc<Engine>> {
        self.engine.load()
    }

    pub fn generation(&self) -> u64 {
        self.generation.load(std::sync::atomic::Ordering::Acquire)
    }

    pub fn nft(&self) -> Option<&Nft> {
        self.nft.as_ref().filter(|_| self.mode == Mode::DnsNft)
    }

    pub async fn policy(&self) -> Policy {
        self.inner.lock().await.policy.clone()
    }

    fn spec(&self, inner: &Inner) -> StaticSpec {
        let mut ip_rules = Vec::new();
        for (targets, action) in [
            (&inner.always.deny, Action::Deny),
            (&inner.always.allow, Action::Allow),
        ] {
            for t in targets {
                if parse_net(t.trim().trim_end_matches('.')).is_some() {
                    ip_rules.push((action, t.trim().to_owned()));
                }
            }
        }
        for rule in &inner.policy.egress {
            if parse_net(rule.target.trim()).is_some() {
                ip_rules.push((rule.action, rule.target.trim().to_owned()));
            }
        }
        StaticSpec {
            ip_rules,
            default_action: inner.policy.default_action,
            ..self.spec_base.clone()
        }
    }

    async fn apply_nft(&self, inner: &Inner, engine: Arc<Engine>) -> Result<(), NftError> {
        match &self.nft {
            Some(nft) => nft.apply(self.spec(inner), engine).await,
            None => Ok(()),
        }
    }

    /// Replaces the user policy (already validated). `source` is `api` for the HTTP API.
    pub async fn set_policy(&self, policy: Policy, source: &str) -> Result<(), CommitError> {
        let mut inner = self.inner.lock().await;
        let old = std::mem::replace(&mut inner.policy, policy);
        if let Some(path) = &self.policy_file
            && let Err(e) = persist(path, &inner.policy)
        {
            inner.policy = old;
            return Err(CommitError::Persist(e));
        }
        let engine = inner.engine();
        if let Err(e) = self.apply_nft(&inner, engine.clone()).await {
            // Nothing changed in the kernel: put the old policy back, on disk too.
            inner.policy = old;
            if let Some(path) = &self.policy_file
                && let Err(pe) = persist(path, &inner.policy)
            {
                tracing::error!(error = %pe, "could not restore the policy file after an nftables failure");
            }
            return Err(e.into());
        }
        self.swap(engine, &inner);
        audit(
            source,
            "policy",
            &old.egress,
            &inner.policy.egress,
            inner.policy.default_action,
        );
        metrics::POLICY_CHANGES.with_label_values(&[source]).inc();
        Ok(())
    }

    /// Applies new always-rule files. On an nftables failure the previous rules stay.
    pub async fn set_always(&self, always: AlwaysRules) -> Result<(), NftError> {
        let mut inner = self.inner.lock().await;
        let old = std::mem::replace(&mut inner.always, always);
        let engine = inner.engine();
        if let Err(e) = self.apply_nft(&inner, engine.clone()).await {
            inner.always = old;
            return Err(e);
        }
        self.swap(engine, &inner);
        for (before, after, action, file) in [
            (&old.deny, &inner.always.deny, Action::Deny, "deny.always"),
            (
                &old.allow,
                &inner.always.allow,
                Action::Allow,
                "allow.always",
            ),
        ] {
            if before != after {
                audit(
                    "always-file",
                    file,
                    &always_rules(before, action),
                    &always_rules(after, action),
                    action,
                );
            }
        }
        metrics::POLICY_CHANGES
            .with_label_values(&["always-file"])
            .inc();
        Ok(())
    }

    fn swap(&self, engine: Arc<Engine>, inner: &Inner) {
        self.engine.store(engine);
        self.generation
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        metrics::RULES.set(rule_count(inner) as i64);
    }
}

impl Inner {
    /// The evaluator for the user policy and the always files as they are now.
    fn engine(&self) -> Arc<Engine> {
        Arc::new(Engine::new(
            &self.policy,
            &self.always.deny,
            &self.always.allow,
        ))
    }
}

fn rule_count(inner: &Inner) -> usize {
    inner.policy.egress.len() + inner.always.deny.len() + inner.always.allow.len()
}

/// PATCH: the new rules go first (first occurrence of a target wins), then the existing rules
/// whose targets the patch does not name. Targets compare case-insensitively.
pub fn merge(policy: &Policy, patch: &[Rule]) -> Policy {
    let mut seen = HashSet::new();
    let mut egress = Vec::new();
    for rule in patch.iter().chain(policy.egress.iter()) {
        if seen.insert(rule.target.trim().to_ascii_lowercase()) {
            egress.push(rule.clone());
        }
    }
    Policy {
        default_action: policy.default_action,
        egress,
    }
}

/// DELETE: removes the rules whose targets are listed (case-insensitive). Returns how many went.
pub fn remove(policy: &mut Policy, targets: &[String]) -> usize {
    let gone: HashSet<String> = targets
        .iter()
        .map(|t| t.trim().to_ascii_lowercase())
        .collect();
    let before = policy.egress.len();
    policy
        .egress
        .retain(|r| !gone.contains(&r.target.trim().to_ascii_lowercase()));
    before - policy.egress.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(action: Action, target: &str) -> Rule {
        Rule {
            action,
            target: target.into(),
        }
    }

    #[test]
    fn patch_puts_new_rules_first_and_delete_removes_targets() {
        let p = Policy {
            default_action: Action::Deny,
            egress: vec![rule(Action::Allow, "a.test"), rule(Action::Deny, "B.test")],
        };
        let m = merge(
            &p,
            &[
                rule(Action::Allow, "b.test"),
                rule(Action::Allow, "c.test"),
                rule(Action::Deny, "c.test"),
            ],
        );
        assert_eq!(
            m.egress,
            vec![
                rule(Action::Allow, "b.test"),
                rule(Action::Allow, "c.test"),
                rule(Action::Allow, "a.test")
            ]
        );
        let mut m = m;
        assert_eq!(
            remove(&mut m, &[" C.TEST ".into(), "nothing.test".into()]),
            1
        );
        assert_eq!(m.egress.len(), 2);
        assert_eq!(mode_name(&m), "enforcing");
        assert_eq!(mode_name(&crate::config::deny_all()), "deny_all");
    }

    #[test]
    fn persist_replaces_the_file_atomically() {
        let dir = std::env::temp_dir().join(format!("egress-persist-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("policy.json");
        std::fs::write(&path, "old").unwrap();
        let p = Policy {
            default_action: Action::Deny,
            egress: vec![rule(Action::Allow, "a.test")],
        };
        persist(&path, &p).unwrap();
        let back = sandbox_api::policy::parse(&std::fs::read_to_string(&path).unwrap()).unwrap();
        assert_eq!(back, p);
        let leftovers: Vec<_> = std::fs::read_dir(&dir).unwrap().collect();
        assert_eq!(leftovers.len(), 1, "no temporary file left behind");
        assert!(persist(&dir.join("missing-dir/policy.json"), &p).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
