//! The Cloister guest SDK. Filled by the guest-SDK issue: WIT bindings and an
//! ergonomic Rust API for wasm32-wasip2 workloads.
