//! Sandbox objects as the cluster stores them (`BatchSandbox`, agent-sandbox `Sandbox`), read
//! into the few fields routing needs.

use std::collections::BTreeMap;
use std::net::IpAddr;

use crate::ports::PortSet;
use sandbox_api::{endpoints, names};
use serde::Deserialize;

/// The subset of a Kubernetes object the gateway reads. `items` holds the objects of a
/// `kind: List`.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Object {
    pub api_version: String,
    pub kind: String,
    pub metadata: Metadata,
    pub status: Status,
    pub items: Vec<Object>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct Metadata {
    pub name: String,
    pub namespace: Option<String>,
    pub annotations: BTreeMap<String, String>,
}

/// Status fields of both kinds; each kind reads its own.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Status {
    /// BatchSandbox: number of ready replicas.
    pub ready: i64,
    /// BatchSandbox: number of replicas.
    pub replicas: i64,
    /// AgentSandbox: the service name that reaches the sandbox.
    #[serde(rename = "serviceFQDN")]
    pub service_fqdn: Option<String>,
    pub conditions: Vec<Condition>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(default)]
pub struct Condition {
    #[serde(rename = "type")]
    pub type_: String,
    pub status: String,
}

/// Where a sandbox's traffic goes, before any name is resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Addresses(Vec<IpAddr>),
    /// A DNS name to resolve off the request path.
    Name(String),
    /// Not routable now, with the reason.
    Unavailable(String),
}

/// One sandbox, ready for the route table once its target is resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sandbox {
    pub namespace: String,
    pub name: String,
    pub token: Option<String>,
    pub target: Target,
    /// Ports requests may reach (`opensandbox.io/exposed-ports`); `None`: every port.
    pub ports: Option<PortSet>,
}

const DEFAULT_NAMESPACE: &str = "default";

fn group_of(api_version: &str) -> &str {
    api_version.split_once('/').map_or("", |(group, _)| group)
}

impl Object {
    /// Reads a sandbox from a `BatchSandbox` or agent-sandbox `Sandbox`; other kinds give `None`.
    pub fn to_sandbox(&self) -> Option<Sandbox> {
        let group = group_of(&self.api_version);
        let target = if self.kind == names::BATCH_SANDBOX_KIND
            && group == names::BATCH_SANDBOX_GROUP
        {
            self.batch_target()
        } else if self.kind == names::AGENT_SANDBOX_KIND && group == names::AGENT_SANDBOX_GROUP {
            self.agent_target()
        } else {
            return None;
        };
        let annotations = &self.metadata.annotations;
        // A malformed list opens no door at all, never every door.
        let (ports, target) = match annotations.get(names::ANNOTATION_EXPOSED_PORTS) {
            None => (None, target),
            Some(text) => match PortSet::parse(text) {
                Ok(set) => (Some(set), target),
                Err(e) => (
                    None,
                    Target::Unavailable(format!(
                        "sandbox {}: malformed {} annotation: {e}; no port is open",
                        self.qualified_name(),
                        names::ANNOTATION_EXPOSED_PORTS
                    )),
                ),
            },
        };
        Some(Sandbox {
            namespace: self
                .metadata
                .namespace
                .clone()
                .unwrap_or_else(|| DEFAULT_NAMESPACE.into()),
            name: self.metadata.name.clone(),
            token: annotations
                .get(names::ANNOTATION_SECURE_ACCESS_TOKEN)
                .filter(|t| !t.is_empty())
                .cloned(),
            target,
            ports,
        })
    }

    fn qualified_name(&self) -> String {
        format!(
            "{}/{}",
            self.metadata
                .namespace
                .as_deref()
                .unwrap_or(DEFAULT_NAMESPACE),
            self.metadata.name
        )
    }

    fn batch_target(&self) -> Target {
        if self.status.ready < 1 {
            return Target::Unavailable(format!(
                "sandbox not ready: {} (ready: {}/{})",
                self.qualified_name(),
                self.status.ready,
                self.status.replicas
            ));
        }
        let annotation = self.metadata.annotations.get(names::ANNOTATION_ENDPOINTS);
        match endpoints::parse(annotation.map(String::as_str)) {
            Ok(addresses) => Target::Addresses(addresses),
            Err(e) => {
                Target::Unavailable(format!("sandbox not ready: {}: {e}", self.qualified_name()))
            }
        }
    }

    fn agent_target(&self) -> Target {
        let ready = self
            .status
            .conditions
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True");
        if !ready {
            return Target::Unavailable(format!(
                "sandbox not ready: sandbox {} not ready",
                self.metadata.name
            ));
        }
        match self.status.service_fqdn.as_deref().map(str::trim) {
            Some(fqdn) if !fqdn.is_empty() => match fqdn.parse::<IpAddr>() {
                Ok(ip) => Target::Addresses(vec![ip]),
                Err(_) => Target::Name(fqdn.trim_end_matches('.').to_owned()),
            },
            _ => Target::Unavailable(format!(
                "sandbox not ready: sandbox {} has no serviceFQDN",
                self.metadata.name
            )),
        }
    }
}

/// Why a sandbox file could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ParseError {
    #[error("document {index}: {source}")]
    Yaml {
        index: usize,
        source: serde_yaml::Error,
    },
    #[error("document {index}: sandbox without metadata.name")]
    Unnamed { index: usize },
    #[error("document {index} is not a Kubernetes object (no apiVersion or kind)")]
    NotAnObject { index: usize },
    #[error(
        "the file holds no object (to empty the table on purpose, write apiVersion: v1, kind: List, items: [])"
    )]
    Empty,
}

/// Reads every sandbox from multi-document YAML; `kind: List` documents are flattened and
/// objects of other kinds are skipped. A file with no object at all, or a document that is not
/// a Kubernetes object, is an error (a truncated or mistaken file must not empty the table); an
/// empty table is written as an empty `kind: List`.
pub fn parse_documents(text: &str) -> Result<Vec<Sandbox>, ParseError> {
    let mut out = Vec::new();
    let mut objects = 0;
    for (index, document) in serde_yaml::Deserializer::from_str(text).enumerate() {
        // Straight into the routing view: no intermediate value tree, whose size would dwarf
        // the table for large files.
        let object = Option::<Object>::deserialize(document)
            .map_err(|source| ParseError::Yaml { index, source })?;
        if let Some(object) = object {
            objects += 1;
            collect(&object, index, &mut out)?;
        }
    }
    if objects == 0 {
        return Err(ParseError::Empty);
    }
    Ok(out)
}

fn collect(object: &Object, index: usize, out: &mut Vec<Sandbox>) -> Result<(), ParseError> {
    if object.api_version.trim().is_empty() || object.kind.trim().is_empty() {
        return Err(ParseError::NotAnObject { index });
    }
    for item in &object.items {
        collect(item, index, out)?;
    }
    if let Some(sandbox) = object.to_sandbox() {
        if sandbox.name.is_empty() {
            return Err(ParseError::Unnamed { index });
        }
        out.push(sandbox);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = r#"
apiVersion: sandbox.opensandbox.io/v1alpha1
kind: BatchSandbox
metadata:
  name: sec
  namespace: team-a
  annotations:
    sandbox.opensandbox.io/endpoints: '["127.0.0.1"]'
    opensandbox.io/secure-access-token: annot-token
status:
  ready: 1
---
---
apiVersion: v1
kind: List
items:
- apiVersion: sandbox.opensandbox.io/v1alpha1
  kind: BatchSandbox
  metadata: {name: down, annotations: {sandbox.opensandbox.io/endpoints: '["127.0.0.1"]'}}
  status: {ready: 0}
- apiVersion: agents.x-k8s.io/v1alpha1
  kind: Sandbox
  metadata: {name: agent, namespace: b}
  status:
    serviceFQDN: agent.b.svc.cluster.local.
    conditions: [{type: Ready, status: "True"}]
- apiVersion: v1
  kind: ConfigMap
  metadata: {name: other}
"#;

    #[test]
    fn reads_documents_and_lists() {
        let got = parse_documents(FILE).unwrap();
        assert_eq!(got.len(), 3);
        assert_eq!(got[0].namespace, "team-a");
        assert_eq!(got[0].token.as_deref(), Some("annot-token"));
        assert_eq!(
            got[0].target,
            Target::Addresses(vec!["127.0.0.1".parse().unwrap()])
        );
        assert_eq!(got[1].namespace, "default");
        assert_eq!(
            got[1].target,
            Target::Unavailable("sandbox not ready: default/down (ready: 0/0)".into())
        );
        assert_eq!(
            got[2].target,
            Target::Name("agent.b.svc.cluster.local".into())
        );
    }

    #[test]
    fn agent_sandbox_without_ready_condition_is_unavailable() {
        let got = parse_documents(
            "apiVersion: agents.x-k8s.io/v1alpha1\nkind: Sandbox\nmetadata: {name: a}\nstatus: {serviceFQDN: x.y}\n",
        )
        .unwrap();
        assert!(matches!(got[0].target, Target::Unavailable(_)));
    }

    #[test]
    fn bundled_example_parses() {
        let got = parse_documents(include_str!("../examples/sandboxes.yaml")).unwrap();
        let names: Vec<&str> = got.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["demo", "demo-secure", "pending"]);
        assert!(matches!(got[2].target, Target::Unavailable(_)));
    }

    #[test]
    fn broken_files_are_errors() {
        assert!(parse_documents("kind: [unclosed").is_err());
        assert!(parse_documents("apiVersion: sandbox.opensandbox.io/v1alpha1\nkind: BatchSandbox\nstatus: {ready: many}\n").is_err());
        let unnamed =
            "apiVersion: sandbox.opensandbox.io/v1alpha1\nkind: BatchSandbox\nmetadata: {}\n";
        assert!(matches!(
            parse_documents(unnamed),
            Err(ParseError::Unnamed { index: 0 })
        ));
        // Nothing, or something that is not a Kubernetes object, never empties the table.
        for nothing in ["", "\n", "# just a comment\n", "---\n---\n"] {
            assert!(
                matches!(parse_documents(nothing), Err(ParseError::Empty)),
                "{nothing:?}"
            );
        }
        for not_object in [
            "name: demo\nready: 1\n",
            "kind: BatchSandbox\nmetadata: {name: a}\n",
            "apiVersion: v1\nkind: List\nitems:\n- metadata: {name: a}\n",
        ] {
            assert!(
                matches!(
                    parse_documents(not_object),
                    Err(ParseError::NotAnObject { index: 0 })
                ),
                "{not_object:?}"
            );
        }
        // An empty table on purpose.
        assert!(
            parse_documents("apiVersion: v1\nkind: List\nitems: []\n")
                .unwrap()
                .is_empty()
        );
    }

    proptest::proptest! {
        #[test]
        fn parser_never_panics(text in "\\PC{0,200}") {
            let _ = parse_documents(&text);
        }

        #[test]
        fn yaml_like_input_never_panics(text in "(apiVersion|kind|metadata|status|items|ready|name|: |- |\n|  |\\{|\\}|\\[|\\]|'|\"|-{3}|[a-z0-9/.]{1,8}){0,60}") {
            let _ = parse_documents(&text);
        }
    }
}
