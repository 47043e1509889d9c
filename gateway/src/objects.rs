//! Sandbox objects as the cluster stores them (`BatchSandbox`, agent-sandbox `Sandbox`), read
//! into the few fields routing needs.

use std::collections::BTreeMap;
use std::net::IpAddr;

use crate::ports::PortSet;
use sandbox_api::{endpoints, names};
use serde::Deserialize;

/// The subset of a Kubernetes object the gateway reads. `items` holds the sandboxes of a
/// `kind: List`, each read as it is parsed.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Object {
    pub api_version: String,
    pub kind: String,
    pub metadata: Metadata,
    pub status: Status,
    pub items: Items,
}

/// The sandboxes of a list, converted item by item while the list is parsed, so a list of a
/// million objects never exists as objects at once. The first item that is not a Kubernetes
/// object or a sandbox without a name is kept as the list's problem.
#[derive(Debug, Default)]
pub struct Items {
    sandboxes: Vec<Sandbox>,
    problem: Option<Problem>,
}

#[derive(Debug, Clone, Copy)]
enum Problem {
    NotAnObject,
    Unnamed,
}

impl<'de> Deserialize<'de> for Items {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = Items;

            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a list of Kubernetes objects")
            }

            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Items, A::Error> {
                let mut items = Items::default();
                while let Some(object) = seq.next_element::<Object>()? {
                    if items.problem.is_none()
                        && let Err(problem) = object.collect(&mut items.sandboxes)
                    {
                        items.problem = Some(problem);
                    }
                }
                Ok(items)
            }

            fn visit_unit<E: serde::de::Error>(self) -> Result<Items, E> {
                Ok(Items::default())
            }
        }
        deserializer.deserialize_seq(Visitor)
    }
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
    /// Ports that speak h2c (`opensandbox.io/h2c-ports`).
    pub h2c: Option<PortSet>,
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
        // A malformed list opens no door at all, never every door; a malformed h2c list does
        // not guess which protocol a port speaks. Either makes the sandbox unavailable, with
        // the reason in every answer.
        let (ports, target) = self.port_list(names::ANNOTATION_EXPOSED_PORTS, target);
        let (h2c, target) = self.port_list(names::ANNOTATION_H2C_PORTS, target);
        let annotations = &self.metadata.annotations;
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
            h2c,
        })
    }

    /// A port-list annotation; a malformed one makes the target unavailable, naming it.
    fn port_list(&self, annotation: &str, target: Target) -> (Option<PortSet>, Target) {
        match self
            .metadata
            .annotations
            .get(annotation)
            .map(|t| PortSet::parse(t))
        {
            None => (None, target),
            Some(Ok(set)) => (Some(set), target),
            Some(Err(e)) => (
                None,
                Target::Unavailable(format!(
                    "sandbox {}: malformed {annotation} annotation: {e}; no port is open",
                    self.qualified_name(),
                )),
            ),
        }
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
    #[error("{0}")]
    Yaml(String),
    #[error("document {index}: sandbox without metadata.name")]
    Unnamed { index: usize },
    #[error("document {index} is not a Kubernetes object (no apiVersion or kind)")]
    NotAnObject { index: usize },
    #[error(
        "the file holds no object (to empty the table on purpose, write apiVersion: v1, kind: List, items: [])"
    )]
    Empty,
}

/// Parser limits sized to the file: a large table parses, while alias expansion (a few bytes
/// that would expand to gigabytes) and deep nesting stay bounded.
fn options(len: usize) -> serde_saphyr::Options {
    let size = len.max(1 << 20);
    let mut budget = serde_saphyr::Budget::default();
    budget.max_reader_input_bytes = Some(size.saturating_add(1 << 20));
    budget.max_events = size;
    budget.max_nodes = size;
    budget.max_documents = size / 16;
    budget.max_total_scalar_bytes = size;
    budget.max_depth = 64;
    serde_saphyr::options! { budget: Some(budget) }
}

/// Reads every sandbox from multi-document YAML; `kind: List` documents are flattened and
/// objects of other kinds are skipped. A file with no object at all, or a document that is not
/// a Kubernetes object, is an error (a truncated or mistaken file must not empty the table); an
/// empty table is written as an empty `kind: List`. The parser streams: list items become
/// sandboxes as they are read, with no tree of the document in between.
pub fn parse_documents(text: &str) -> Result<Vec<Sandbox>, ParseError> {
    let documents = match json_documents(text.as_bytes()) {
        Some(documents) => documents,
        None => serde_saphyr::from_multiple_with_options::<Object>(text, options(text.len()))
            .map_err(|e| ParseError::Yaml(e.to_string()))?,
    };
    sandboxes(documents)
}

/// [`parse_documents`] for a file of `len` bytes. Both parsers read a slice several times
/// faster than a reader (the YAML parser decodes a reader character by character), so the text
/// is read whole and freed as soon as it is parsed; the objects are built as it is read.
pub fn parse_file(file: std::fs::File, len: u64) -> Result<Vec<Sandbox>, ParseError> {
    use std::io::Read;
    let len = usize::try_from(len).unwrap_or(usize::MAX);
    let mut bytes = Vec::with_capacity(len.saturating_add(1));
    std::io::BufReader::with_capacity(1 << 16, file)
        .read_to_end(&mut bytes)
        .map_err(|e| ParseError::Yaml(format!("cannot read: {e}")))?;
    if let Some(documents) = json_documents(&bytes) {
        drop(bytes);
        return sandboxes(documents);
    }
    let text = String::from_utf8(bytes).map_err(|e| {
        ParseError::Yaml(format!(
            "not UTF-8 text (invalid byte at offset {})",
            e.utf8_error().valid_up_to()
        ))
    })?;
    let documents = serde_saphyr::from_multiple_with_options::<Object>(&text, options(text.len()))
        .map_err(|e| ParseError::Yaml(e.to_string()))?;
    drop(text);
    sandboxes(documents)
}

fn sandboxes(documents: Vec<Object>) -> Result<Vec<Sandbox>, ParseError> {
    if documents.is_empty() {
        return Err(ParseError::Empty);
    }
    let mut out = Vec::new();
    for (index, object) in documents.into_iter().enumerate() {
        object.collect(&mut out).map_err(|problem| match problem {
            Problem::NotAnObject => ParseError::NotAnObject { index },
            Problem::Unnamed => ParseError::Unnamed { index },
        })?;
    }
    Ok(out)
}

/// JSON (what `kubectl get -o json` writes) is YAML too, and a JSON parser reads it many times
/// faster. A file that starts like JSON is tried as a stream of JSON objects first; anything
/// that is not valid JSON goes to the YAML parser, whose error is the one reported.
fn json_documents(bytes: &[u8]) -> Option<Vec<Object>> {
    if !looks_like_json(bytes) {
        return None;
    }
    serde_json::Deserializer::from_slice(bytes)
        .into_iter::<Object>()
        .collect::<Result<Vec<_>, _>>()
        .ok()
}

fn looks_like_json(start: &[u8]) -> bool {
    start.trim_ascii_start().starts_with(b"{")
}

impl Object {
    /// Appends the sandbox this object is, or the sandboxes of its list.
    fn collect(mut self, out: &mut Vec<Sandbox>) -> Result<(), Problem> {
        if self.api_version.trim().is_empty() || self.kind.trim().is_empty() {
            return Err(Problem::NotAnObject);
        }
        let items = std::mem::take(&mut self.items);
        if let Some(problem) = items.problem {
            return Err(problem);
        }
        if out.is_empty() {
            // A list's vector is moved, not copied (a million sandboxes in the common case).
            *out = items.sandboxes;
        } else {
            out.extend(items.sandboxes);
        }
        if let Some(sandbox) = self.to_sandbox() {
            if sandbox.name.is_empty() {
                return Err(Problem::Unnamed);
            }
            out.push(sandbox);
        }
        Ok(())
    }
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

    fn file_of(text: &str) -> (std::fs::File, u64) {
        use std::io::{Seek, Write};
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(text.as_bytes()).unwrap();
        file.rewind().unwrap();
        (file, text.len() as u64)
    }

    #[test]
    fn files_read_as_yaml_or_json() {
        let (file, len) = file_of(FILE);
        assert_eq!(
            parse_file(file, len).unwrap(),
            parse_documents(FILE).unwrap()
        );
        // `kubectl get -o json`, and concatenated JSON objects.
        let json = r#"{"apiVersion": "v1", "kind": "List", "items": [
            {"apiVersion": "sandbox.opensandbox.io/v1alpha1", "kind": "BatchSandbox",
             "metadata": {"name": "j", "namespace": "n", "annotations":
                {"sandbox.opensandbox.io/endpoints": "[\"10.0.0.1\"]"}},
             "status": {"ready": 1, "replicas": 1}}]}
            {"apiVersion": "agents.x-k8s.io/v1alpha1", "kind": "Sandbox", "metadata": {"name": "k"},
             "status": {"serviceFQDN": "10.0.0.2", "conditions": [{"type": "Ready", "status": "True"}]}}"#;
        for got in [parse_documents(json).unwrap(), {
            let (file, len) = file_of(json);
            parse_file(file, len).unwrap()
        }] {
            let names: Vec<&str> = got.iter().map(|s| s.name.as_str()).collect();
            assert_eq!(names, ["j", "k"]);
            assert_eq!(
                got[0].target,
                Target::Addresses(vec!["10.0.0.1".parse().unwrap()])
            );
        }
        // A flow mapping is YAML but not JSON: read by the YAML parser.
        let flow = "{apiVersion: sandbox.opensandbox.io/v1alpha1, kind: BatchSandbox, metadata: {name: f}, status: {ready: 0}}\n";
        let (file, len) = file_of(flow);
        assert_eq!(parse_file(file, len).unwrap()[0].name, "f");
        // Broken JSON is reported by the YAML parser, and loses nothing.
        let (file, len) = file_of("{\"apiVersion\": \"v1\", \"kind\": ");
        assert!(matches!(parse_file(file, len), Err(ParseError::Yaml(_))));
        // Bytes that are not UTF-8 are named by offset.
        let mut file = tempfile::tempfile().unwrap();
        {
            use std::io::{Seek, Write};
            file.write_all(b"apiVersion: v1\nkind: \xff\n").unwrap();
            file.rewind().unwrap();
        }
        let error = parse_file(file, 22).unwrap_err().to_string();
        assert!(
            error.contains("not UTF-8") && error.contains("offset 21"),
            "{error}"
        );
    }

    #[test]
    fn list_problems_are_typed_at_any_depth() {
        let nested_unnamed = "apiVersion: v1\nkind: List\nitems:\n- apiVersion: v1\n  kind: List\n  items:\n  - {apiVersion: sandbox.opensandbox.io/v1alpha1, kind: BatchSandbox, metadata: {}}\n";
        assert!(matches!(
            parse_documents(nested_unnamed),
            Err(ParseError::Unnamed { index: 0 })
        ));
        let second = "apiVersion: v1\nkind: List\nitems: []\n---\napiVersion: v1\nkind: List\nitems:\n- {kind: BatchSandbox}\n";
        assert!(matches!(
            parse_documents(second),
            Err(ParseError::NotAnObject { index: 1 })
        ));
    }

    #[test]
    fn alias_bombs_are_refused() {
        // Nine levels of ten aliases each would expand to a billion strings.
        let mut bomb = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
        for i in 1..10 {
            let p = i - 1;
            bomb.push_str(&format!(
                "a{i}: &a{i} [*a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}]\n"
            ));
        }
        let doc = format!(
            "apiVersion: v1\nkind: List\nmetadata:\n  annotations: {{}}\nbomb:\n{}",
            bomb.lines().map(|l| format!("  {l}\n")).collect::<String>()
        );
        let started = std::time::Instant::now();
        let (file, len) = file_of(&doc);
        let error = parse_file(file, len).unwrap_err().to_string();
        assert!(
            error.contains("alias") || error.contains("budget"),
            "{error}"
        );
        assert!(started.elapsed() < std::time::Duration::from_secs(5));
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
