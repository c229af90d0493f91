//! The Cloister key broker (KMS analog). Filled by the key-broker issue: keys,
//! AWS-style two-factor policies, signed principal requests, attested key release.
