//! The Kubernetes REST API, served by every server over its replicated store: discovery,
//! the verbs on every resource of `corral_api::resources`, watches, and HTTPS with client
//! certificates or bearer tokens; and the endpoint agents reach the cluster through (`agents`).

pub mod agents;
pub mod api;
mod cache;
pub mod defaults;
pub mod discovery;
pub mod http;
pub mod local;
mod metrics;
pub mod namespaces;
mod node_streams;
pub mod route;
pub mod services;
pub mod storage;
mod validate;

pub use api::Api;
pub use http::{ServerConfig, Tokens, serve, tls_config};
pub use storage::ObjectStore;
