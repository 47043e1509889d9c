//! Resource, annotation and header names of the compatibility contract.

/// API group of the `BatchSandbox` custom resource.
pub const BATCH_SANDBOX_GROUP: &str = "sandbox.opensandbox.io";
/// API version of the `BatchSandbox` custom resource.
pub const BATCH_SANDBOX_VERSION: &str = "v1alpha1";
/// Kind of the `BatchSandbox` custom resource.
pub const BATCH_SANDBOX_KIND: &str = "BatchSandbox";

/// API group of the agent-sandbox `Sandbox` custom resource.
pub const AGENT_SANDBOX_GROUP: &str = "agents.x-k8s.io";
/// API version of the agent-sandbox `Sandbox` custom resource.
pub const AGENT_SANDBOX_VERSION: &str = "v1alpha1";
/// Kind of the agent-sandbox custom resource.
pub const AGENT_SANDBOX_KIND: &str = "Sandbox";

/// Compact JSON array of pod IPs, one per replica in index order.
pub const ANNOTATION_ENDPOINTS: &str = "sandbox.opensandbox.io/endpoints";
/// When non-empty the sandbox is secure and requests must carry this token or a signed route.
pub const ANNOTATION_SECURE_ACCESS_TOKEN: &str = "opensandbox.io/secure-access-token";
/// Asks the controller to provision a secure-access token.
pub const ANNOTATION_SECURE_ACCESS: &str = "opensandbox.io/secure-access";
/// Token of the egress sidecar's policy API.
pub const ANNOTATION_EGRESS_AUTH_TOKEN: &str = "opensandbox.io/egress-auth-token";
/// Egress policy JSON for the sidecar.
pub const ANNOTATION_NETWORK_POLICY: &str = "opensandbox.io/network-policy";
/// Ports of the sandbox the gateway forwards to (`"8080,3000,9000-9010"`); absent: every port.
pub const ANNOTATION_EXPOSED_PORTS: &str = "opensandbox.io/exposed-ports";
/// Ports of the sandbox that speak HTTP/2 in cleartext (h2c, e.g. gRPC servers), written like
/// [`ANNOTATION_EXPOSED_PORTS`]; the gateway forwards every request to them over HTTP/2.
pub const ANNOTATION_H2C_PORTS: &str = "opensandbox.io/h2c-ports";

/// Routing header: `<sandbox-id>-<port>`.
pub const HEADER_INGRESS_TO: &str = "opensandbox-ingress-to";
/// Deprecated routing header, read when [`HEADER_INGRESS_TO`] is absent.
pub const HEADER_INGRESS_LEGACY: &str = "open-sandbox-ingress";
/// Per-sandbox credential header.
pub const HEADER_SECURE_ACCESS: &str = "opensandbox-secure-access";
/// Response header the gateway adds to every proxied response.
pub const HEADER_POWERED_BY: &str = "reverse-proxy-server-powerby";
/// Value of [`HEADER_POWERED_BY`].
pub const POWERED_BY_VALUE: &str = "OpenSandbox-ingress";
