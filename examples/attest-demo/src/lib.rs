//! Answers a challenge: the request is the caller's nonce (at most 1024 bytes),
//! the response the enclave's attestation document over it, signed by the NSM.
//! Verify it with `cloister attestation verify --expect-nonce HEX --expect-pcr 0=...`.

use cloister_guest::{Error, Handler, error, nsm};

struct AttestDemo;

impl Handler for AttestDemo {
    fn handle(nonce: Vec<u8>) -> Result<Vec<u8>, Error> {
        if nonce.is_empty() || nonce.len() > 1024 {
            return Err(error("E-DEMO-NONCE", "send a nonce of 1 to 1024 bytes"));
        }
        nsm::attestation(None, Some(&nonce), None)
    }
}

cloister_guest::export_workload!(AttestDemo);
