//! The Cloister guest SDK: bindings to the enclave runtime's imports (the WIT
//! world `cloister:enclave/workload` in `wit/`) for wasm32-wasip2 workloads.
//!
//! A workload implements [`Handler`] and exports it with [`export_workload!`]:
//!
//! ```ignore
//! struct Echo;
//! impl cloister_guest::Handler for Echo {
//!     fn handle(request: Vec<u8>) -> Result<Vec<u8>, cloister_guest::Error> {
//!         Ok(request)
//!     }
//! }
//! cloister_guest::export_workload!(Echo);
//! ```

pub mod sealed;

#[doc(hidden)]
#[allow(unsafe_code, clippy::all, missing_docs)]
pub mod bindings {
    wit_bindgen::generate!({
        world: "workload",
        path: "wit",
        pub_export_macro: true,
        export_macro_name: "__export_workload",
        default_bindings_module: "cloister_guest::__bindings",
    });
}

#[doc(hidden)]
pub use bindings as __bindings;

pub use bindings::cloister::enclave::types::{Error, KeyHandle};
pub use bindings::cloister::enclave::{console, keys, kms, nsm};
pub use bindings::exports::cloister::enclave::handler::Guest as Handler;

/// Exports a type implementing [`Handler`] as the workload's `handler`.
#[macro_export]
macro_rules! export_workload {
    ($t:ident) => {
        $crate::__bindings::__export_workload!($t with_types_in $crate::__bindings);
    };
}

/// An [`Error`] with a code and a message.
pub fn error(code: &str, message: impl Into<String>) -> Error {
    Error {
        code: code.to_owned(),
        message: message.into(),
    }
}
