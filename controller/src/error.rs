//! The controller's one error type; `reconcile::error_policy` turns it into a retry.

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("object has no {0}")]
    Missing(&'static str),
}
