#!/usr/bin/env bash
# The attestation demo: an emulated platform attests a measurement, the verifier
# proves what it says, and refuses tampered, replayed, debug and foreign documents;
# a real AWS Nitro document is verified by the same code.
set -euo pipefail
cd "$(dirname "$0")/../.."

rustup target add wasm32-wasip2 >/dev/null 2>&1 || rustup target add wasm32-wasip2
cargo build --quiet --locked -p cloister-host -p cloister-runtime
cargo build --quiet --locked --release --target wasm32-wasip2 --manifest-path examples/Cargo.toml
cloister=$PWD/target/debug/cloister
work=$(mktemp -d "${TMPDIR:-/tmp}/cloister-demo.XXXXXX")
chmod 755 "$work"   # enclave runtimes (their own uids, as root) pass through it
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"' EXIT
step() { printf '\n== %s\n' "$*"; }
must_fail() { if "$@" >"$work/out" 2>"$work/err"; then echo "UNEXPECTED SUCCESS: $*"; exit 1; fi; head -1 "$work/err"; }

step "1. The platform owner creates a root CA and this host's NSM certificate"
$cloister platform init --dir "$work/platform" --name demo-platform | sed 's/^/   /'
if command -v openssl >/dev/null; then
  printf '   openssl verify of the NSM chain: '; openssl verify -CAfile "$work/platform/root.pem" "$work/platform/nsm.pem"
fi

step "2. Measurements: PCR0 of an image, PCR3 of the parent's role (Nitro recipes)"
head -c 4096 /dev/urandom >"$work/image.bin"
pcr0=$($cloister pcr --input "$work/image.bin" | sed -n 's/.*"PCR": "\(.*\)".*/\1/p')
pcr3=$($cloister pcr --string arn:aws:iam::123456789012:role/Webserver | sed -n 's/.*"PCR": "\(.*\)".*/\1/p')
echo "   PCR0 = $pcr0"
echo "   PCR3 = $pcr3   (AWS's documented example starts 78fce75d)"

step "3. The verifier sends a fresh challenge; the NSM signs a document answering it"
nonce=$(od -An -tx1 -N32 /dev/urandom | tr -d ' \n')
$cloister platform attest --dir "$work/platform" --pcr "0=$pcr0" --pcr "3=$pcr3" \
  --nonce "$nonce" --out "$work/doc.cose" 2>/dev/null >/dev/null
$cloister attestation verify --doc "$work/doc.cose" --root "$work/platform/root.pem" \
  --expect-pcr "0=$pcr0" --expect-pcr "3=$pcr3" --expect-nonce "$nonce" --max-age 60 \
  | grep -E '"(Verified|Algorithm|Timestamp|Debug|TrustAnchor)"' | sed 's/^ */   /'

step "4. Refusals"
printf -- '- one flipped byte:       '
cp "$work/doc.cose" "$work/tampered.cose"
byte=$(od -An -tu1 -j200 -N1 "$work/doc.cose" | tr -d ' ')
printf "\\$(printf %03o $((byte ^ 1)))" | dd of="$work/tampered.cose" bs=1 seek=200 conv=notrunc status=none
must_fail $cloister attestation verify --doc "$work/tampered.cose" --root "$work/platform/root.pem"
printf -- '- replayed (old nonce):   '
must_fail $cloister attestation verify --doc "$work/doc.cose" --root "$work/platform/root.pem" --expect-nonce "00$nonce"
printf -- '- another platform:       '
$cloister platform init --dir "$work/other" >/dev/null
must_fail $cloister attestation verify --doc "$work/doc.cose" --root "$work/other/root.pem"
printf -- '- debug-mode enclave:     '
$cloister platform attest --dir "$work/platform" --debug --out "$work/debug.cose" 2>/dev/null >/dev/null
must_fail $cloister attestation verify --doc "$work/debug.cose" --root "$work/platform/root.pem" --expect-pcr "0=$pcr0"
printf -- '- nothing trusted:        '
must_fail $cloister attestation verify --doc "$work/doc.cose"

step "5. An enclave answers a challenge with its own attestation document"
$cloister build-enclave --wasm examples/target/wasm32-wasip2/release/attest_demo.wasm --name attest-demo --version 1 \
  --output "$work/attest.cimg" >"$work/build.json"
image_pcr0=$(sed -n 's/.*"PCR0": "\(.*\)".*/\1/p' "$work/build.json")
# The supervisor holds the platform's NSM key and launches the enclave runtime.
$cloister supervisor --state-dir "$work/state" --platform "$work/platform" \
  --listen "unix:$work/supervisor.sock" 2>"$work/supervisor.log" & pids+=($!)
export CLOISTER_SUPERVISOR="unix:$work/supervisor.sock"
for _ in $(seq 200); do [ -S "$work/supervisor.sock" ] && break; sleep 0.05; done
$cloister run-enclave --image "$work/attest.cimg" --enclave-name attest >/dev/null
nonce=$(od -An -tx1 -N32 /dev/urandom | tr -d ' \n')
printf "$(echo "$nonce" | sed 's/\(..\)/\\x\1/g')" >"$work/nonce.bin"
$cloister call --enclave-name attest --input "$work/nonce.bin" --output "$work/enclave.cose"
$cloister attestation verify --doc "$work/enclave.cose" --root "$work/platform/root.pem" \
  --expect-pcr "0=$image_pcr0" --expect-nonce "$nonce" --max-age 60 \
  | grep -E '"(Verified|ModuleId|Debug)"' | sed 's/^ */   /'
echo "   PCR0 matches build-enclave's measurement and the nonce is ours"

step "6. A real AWS Nitro document (ES384, AWS root pinned by fingerprint)"
real=attestation/testdata/nitro/real-production.cose
$cloister attestation verify --doc "$real" --aws-nitro-root --at 2024-07-31T20:18:27.047Z \
  | grep -E '"(Verified|Algorithm|ModuleId|TimestampUtc|PCR0)"' | sed 's/^ */   /'
printf -- '- the same document today: '
must_fail $cloister attestation verify --doc "$real" --aws-nitro-root
printf -- '- AWS document with a bad signature: '
must_fail $cloister attestation verify --doc attestation/testdata/nitro/real-bad-signature.cose --aws-nitro-root --at 1721770180771

step "7. The key broker releases a key only to the enclave of that image"
kms="$work/kms"
$cloister kms init --data-dir "$kms" >/dev/null
$cloister kms serve --data-dir "$kms" --listen "unix:$work/kms.sock" >/dev/null 2>"$work/kms.err" &
kms_pid=$!
pids+=($kms_pid)
for _ in $(seq 100); do [ -S "$work/kms.sock" ] && break; sleep 0.05; done
export CLOISTER_KMS_ENDPOINT="unix:$work/kms.sock" CLOISTER_PRINCIPAL=admin CLOISTER_PRINCIPAL_KEY="$kms/admin.key"
$cloister kms trust add --root "$work/platform/root.pem" --label demo-platform >/dev/null
cat >"$work/key-policy.json" <<POLICY
{"Version":"2012-10-17","Statement":[
 {"Sid":"Admin","Effect":"Allow","Principal":{"AWS":"admin"},"Action":["kms:Encrypt","kms:DescribeKey","kms:GetKeyPolicy","kms:PutKeyPolicy"],"Resource":"*"},
 {"Sid":"ScorerEnclaveOnly","Effect":"Allow","Principal":{"AWS":"admin"},"Action":"kms:Decrypt","Resource":"*",
  "Condition":{"StringEqualsIgnoreCase":{"kms:RecipientAttestation:ImageSha384":"$pcr0"}}}]}
POLICY
key=$($cloister kms create-key --description demo --policy "file://$work/key-policy.json" | sed -n 's/.*"KeyId": "\(.*\)".*/\1/p')
echo "   key $key: Decrypt only for an enclave whose PCR0 is $pcr0"
$cloister kms encrypt --key-id "$key" --plaintext "a data key" | sed -n 's/.*"CiphertextBlob": "\(.*\)".*/\1/p' | base64 -d >"$work/blob"
head -c 32 /dev/urandom >"$work/enclave.pub"   # an X25519 public key; the enclave keeps its private half
$cloister platform attest --dir "$work/platform" --pcr "0=$pcr0" --public-key "$work/enclave.pub" --out "$work/enclave.cose" 2>/dev/null >/dev/null
printf -- '- the right image:          '
$cloister kms decrypt --ciphertext-blob "fileb://$work/blob" \
  --recipient "KeyEncryptionAlgorithm=HPKE-Base-X25519-SHA256-AES256GCM,AttestationDocument=fileb://$work/enclave.cose" \
  | grep -q '"CiphertextForRecipient"' && echo "released, only as CiphertextForRecipient (HPKE to the enclave's key)"
printf -- '- no attestation:           '
must_fail $cloister kms decrypt --ciphertext-blob "fileb://$work/blob"
printf -- '- a modified image:         '
other=$(printf 'ab%.0s' $(seq 48))
$cloister platform attest --dir "$work/platform" --pcr "0=$other" --public-key "$work/enclave.pub" --out "$work/other.cose" 2>/dev/null >/dev/null
must_fail $cloister kms decrypt --ciphertext-blob "fileb://$work/blob" \
  --recipient "AttestationDocument=fileb://$work/other.cose"
kill -TERM $kms_pid; wait $kms_pid || true
printf -- '- the audit log:            '
$cloister kms audit verify --data-dir "$kms" | tr -d '\n ' ; echo

cat <<'DONE'

What was proved
- The emulated NSM's document is a COSE_Sign1 (EdDSA) whose X.509 chain ends in the
  platform root, and openssl accepts that chain independently.
- The verifier accepted it only with the expected PCR0/PCR3 and the fresh nonce, and
  refused a one-byte change, a replayed answer, a foreign root, a debug enclave's
  all-zero PCRs and an empty trust store, each with a stable error code.
- The same verifier checks real AWS Nitro documents (ES384, P-384 chain to the pinned
  AWS root) at their own time, and rejects them today as expired and when the
  signature is wrong.
- The key broker released a key pinned to PCR0 only to a document of that image, and
  only encrypted to the enclave's key; it refused an unattested caller and a modified
  image with the reason, and its hash-chained audit log verifies.
DONE
