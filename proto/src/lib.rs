//! Cloister's wire layer, shared by every process.
//!
//! - [`Address`]: the one address syntax used everywhere (`vsock:CID:PORT`,
//!   `unix:PATH`, `tcp:HOST:PORT`), with async [`connect`] and [`listen`].
//! - [`frame`]: versioned, length-prefixed frames whose size is checked against a
//!   hard cap *before* anything is allocated, and CBOR message helpers.
//! - [`call`]: the call protocol between callers and enclave runtimes.
//! - [`codes`]: stable error codes (`E-...`) and the text `cloister explain` prints.

pub mod address;
pub mod call;
pub mod codes;
pub mod frame;
pub mod transport;

pub use address::{Address, AddressError};
pub use codes::{CodeInfo, ErrorCode};
pub use frame::{FrameError, MAX_FRAME_LEN, PROTOCOL_VERSION};
pub use transport::{Listener, Stream, TransportError, connect, listen, vsock_loopback_available};
