//! Kubernetes objects as Corral serves them, with no I/O: the resources and their discovery
//! data, object metadata rules, label and field selectors, patches, server-side tables and
//! `metav1.Status` errors. `corral-apiserver` puts these behind HTTP and the store.

pub mod apply;
pub mod deletion;
pub mod events;
pub mod meta;
pub mod metrics;
pub mod net;
pub mod openapi;
pub mod patch;
pub mod protobuf;
pub mod quantity;
pub mod resources;
pub mod selector;
pub mod status;
pub mod table;

pub use resources::Resource;
pub use status::{ApiError, FieldError};
