#!/usr/bin/env bash
# Confidential inference, end to end, in a fresh directory: a model owner seals
# an ONNX classifier under their KMS key, a data owner seals patient records
# under theirs; each key policy pins the inference image's PCR0, and the image's
# measured configuration pins the model's SHA-256. The enclave opens both,
# scores the records with tract, and seals the predictions for the data owner,
# who opens them and compares them with scikit-learn's. Then each owner's
# control is shown: the model owner disables their key and the next run is
# refused; another model, even sealed under the right key, is refused.
#
#   MODEL=logreg|forest|mlp examples/inference/run.sh     (default logreg)
#
# Run as root, the parent's commands run as `nobody` and the enclave runtime as
# a uid of its own.
set -euo pipefail
cd "$(dirname "$0")/../.."

MODEL=${MODEL:-logreg}
case $MODEL in logreg | forest | mlp) ;; *) echo "MODEL must be logreg, forest or mlp" >&2; exit 2 ;; esac
rustup target add wasm32-wasip2 >/dev/null 2>&1 || rustup target add wasm32-wasip2
echo "== building (the first run compiles wasmtime and tract; later runs are quick)"
cargo build --quiet --locked -p cloister-host -p cloister-runtime
cargo build --quiet --locked --release --target wasm32-wasip2 --manifest-path examples/Cargo.toml
target_dir() { cargo metadata --format-version 1 --no-deps "$@" | sed 's/.*"target_directory":"\([^"]*\)".*/\1/'; }
cloister=$(target_dir)/debug/cloister
wasm=$(target_dir --manifest-path examples/Cargo.toml)/wasm32-wasip2/release/inference.wasm
example=$PWD/examples/inference

work=$(mktemp -d "${TMPDIR:-/tmp}/cloister-inference.XXXXXX")
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
step() { printf '\n== %s\n' "$*"; }
json() { sed -n "s/^ *\"$1\": \"\\{0,1\\}\\([^\",]*\\)\"\\{0,1\\},\\{0,1\\}\$/\\1/p" | head -1; }
role=arn:aws:iam::123456789012:role/Inference

chmod 755 "$work"
mkdir "$work/parent"
if [ "$(id -u)" = 0 ] && command -v setpriv >/dev/null; then
  parent_uid=65534
  chown "$parent_uid:$parent_uid" "$work/parent"
  parent_cmd=(setpriv --reuid="$parent_uid" --regid="$parent_uid" --clear-groups --)
else
  parent_uid=$(id -u)
  parent_cmd=()
fi
as_parent() { "${parent_cmd[@]}" "$@"; }

step "1. Platform, supervisor, key broker, the parent's proxy; principals model-owner, data-owner, the parent's role"
"$cloister" platform init --dir "$work/platform" --name inference-host >/dev/null
"$cloister" supervisor --state-dir "$work/state" --platform "$work/platform" \
  --listen "unix:$work/supervisor.sock" --allow-uid "$parent_uid" 2>"$work/supervisor.log" & pids+=($!)
export CLOISTER_SUPERVISOR="unix:$work/supervisor.sock"
"$cloister" kms init --data-dir "$work/kms" >/dev/null
"$cloister" kms serve --data-dir "$work/kms" --listen "unix:$work/kms.sock" >/dev/null 2>"$work/kms.log" & pids+=($!)
for _ in $(seq 200); do [ -S "$work/kms.sock" ] && [ -S "$work/supervisor.sock" ] && break; sleep 0.05; done
chmod 666 "$work/kms.sock"
printf '{"allowlist": ["unix:%s/kms.sock"]}\n' "$work" >"$work/proxy-allowlist.json"
"${parent_cmd[@]}" "$cloister" proxy --listen "unix:$work/parent/proxy.sock" --to "unix:$work/kms.sock" \
  --allowlist "$work/proxy-allowlist.json" >/dev/null & pids+=($!)
for _ in $(seq 200); do [ -S "$work/parent/proxy.sock" ] && break; sleep 0.05; done
export CLOISTER_KMS_ENDPOINT="unix:$work/kms.sock"
as() { local who=$1; shift; CLOISTER_PRINCIPAL=$who CLOISTER_PRINCIPAL_KEY="$work/$who.key" "$cloister" "$@"; }
cp "$work/kms/admin.key" "$work/admin.key"
as admin kms trust add --root "$work/platform/root.pem" --label inference-host >/dev/null
echo '{"Version":"2012-10-17","Statement":{"Effect":"Allow","Action":"kms:*","Resource":"*"}}' >"$work/identity.json"
for who in model-owner data-owner; do
  "$cloister" keygen --private-key "$work/$who.key" --public-key "$work/$who.pub" >/dev/null
  as admin kms principal add --name "$who" --public-key "$work/$who.pub" --policy "file://$work/identity.json" >/dev/null
done
"$cloister" keygen --private-key "$work/parent/parent.key" --public-key "$work/parent/parent.pub" >/dev/null
chown "$parent_uid" "$work/parent/parent.key"
as admin kms principal add --name "$role" --public-key "$work/parent/parent.pub" --policy "file://$work/identity.json" >/dev/null

step "2. The inference image: the engine (tract) and, in its measured configuration, the one model it runs"
model_sha=$(sha256sum "$example/models/$MODEL.onnx" | cut -d' ' -f1)
"$cloister" build-enclave --wasm "$wasm" --name inference --version 1.0 \
  --kms-broker-key "$work/kms/broker.pub" --config "model-sha256=$model_sha" \
  --config model-context=purpose=model --config records-context=purpose=records \
  --config output-key-id=alias/predictions --config output-context=purpose=predictions \
  --config class-names=malignant,benign --output "$work/inference.cimg" >"$work/build.json"
pcr0=$(json PCR0 <"$work/build.json")
echo "   model: $MODEL.onnx, SHA-256 $model_sha"
echo "   PCR0 (image, engine and configuration): $pcr0"

step "3. Each owner's key: the owner manages it; the parent's role may use it only from that image"
echo "   (model and records: Decrypt; predictions: GenerateDataKey, so earlier predictions cannot be fed back in)"
policy() { # OWNER ACTION
  cat <<POLICY
{"Version":"2012-10-17","Statement":[
 {"Sid":"Owner","Effect":"Allow","Principal":{"AWS":"$1"},"Action":"kms:*","Resource":"*"},
 {"Sid":"InferenceEnclaveOnly","Effect":"Allow","Principal":{"AWS":"$role"},
  "Action":"$2","Resource":"*",
  "Condition":{"StringEqualsIgnoreCase":{"kms:RecipientAttestation:ImageSha384":"$pcr0"}}}]}
POLICY
}
key() { # OWNER ALIAS ACTION (what the enclave may do with it)
  policy "$1" "$3" >"$work/$1.policy.json"
  local id; id=$(as "$1" kms create-key --description "$2" --policy "file://$work/$1.policy.json" | json KeyId)
  as "$1" kms create-alias --alias-name "$2" --target-key-id "$id" >/dev/null
  echo "   $1: $2 -> $id" >&2
  echo "$id"
}
model_key=$(key model-owner alias/model kms:Decrypt)
key data-owner alias/records kms:Decrypt >/dev/null
key data-owner alias/predictions kms:GenerateDataKey >/dev/null

step "4. Both owners seal their bytes"
as model-owner encrypt --key-id alias/model --encryption-context "purpose=model,model=$MODEL" \
  --in "$example/models/$MODEL.onnx" --out "$work/parent/model.sealed" >/dev/null
as data-owner encrypt --key-id alias/records --encryption-context purpose=records,study=breast-cancer \
  --in "$example/data/heldout.csv" --out "$work/parent/records.sealed" >/dev/null
echo "   model:   $(wc -c <"$example/models/$MODEL.onnx") bytes of ONNX -> $(wc -c <"$work/parent/model.sealed") bytes sealed (model owner's key)"
echo "   records: $(($(wc -l <"$example/data/heldout.csv") - 1)) held-out patients, 30 features each -> $(wc -c <"$work/parent/records.sealed") bytes sealed (data owner's key)"

step "5. The parent launches the enclave and relays the two sealed parts"
cp "$work/inference.cimg" "$work/parent/" && chown -R "$parent_uid" "$work/parent"
as_parent "$cloister" run-enclave --image "$work/parent/inference.cimg" --enclave-name inference \
  --parent-role "$role" --kms-proxy "unix:$work/parent/proxy.sock" --kms-principal "$role" \
  --kms-principal-key "$work/parent/parent.key" >"$work/run.json"
echo "   who runs as whom: owners, broker, supervisor uid $(id -u); enclave runtime uid $(json RuntimeUid <"$work/run.json"); parent uid $parent_uid"
score() { as_parent "$cloister" call --enclave-name inference --part "model=$1" \
  --part "records=$work/parent/records.sealed" --output "$work/parent/response.bin"; }
t0=$(date +%s%3N)
score "$work/parent/model.sealed"
echo "   scored in $(( $(date +%s%3N) - t0 )) ms (two attested key releases, model load, inference, sealing)"
echo "   in the clear: $(head -n 1 "$work/parent/response.bin")"
tail -n +2 "$work/parent/response.bin" >"$work/predictions.sealed"

step "6. The data owner opens the predictions and compares them with scikit-learn's"
as data-owner decrypt --in "$work/predictions.sealed" --out "$work/predictions.csv" >/dev/null
sed -n 1,3p "$work/predictions.csv" | sed 's/^/   /'
paste -d, "$work/predictions.csv" "$example/data/expected-$MODEL.csv" | awk -F, '
  NR > 1 { if ($1 != $4) { print "   MISMATCH: rows out of order"; bad = 1; exit }
           for (i = 2; i <= 3; i++) { d = $i - $(i + 3); if (d < 0) d = -d; if (d > worst) worst = d } }
  END { if (!bad) printf "   %d predictions; largest difference from scikit-learn: %.1e (bound 1e-5)\n", NR - 1, worst
        exit (bad || worst > 1e-5) }'

step "7. Each owner stays in control"
printf -- '- the model owner disables their key; the next run: '
as model-owner kms disable-key --key-id "$model_key" >/dev/null
if score "$work/parent/model.sealed" 2>"$work/err"; then echo "NOT REFUSED"; exit 1; fi
grep -o 'DisabledException: key [^ ]* is disabled' "$work/err" | head -1 | sed 's/^/refused: /'
as model-owner kms enable-key --key-id "$model_key" >/dev/null
printf -- '- another model, sealed under the right key:      '
other=forest; [ "$MODEL" = forest ] && other=mlp
as model-owner encrypt --key-id alias/model --encryption-context "purpose=model,model=$other" \
  --in "$example/models/$other.onnx" --out "$work/parent/other.sealed" >/dev/null
chown "$parent_uid" "$work/parent/other.sealed"
if score "$work/parent/other.sealed" 2>"$work/err"; then echo "NOT REFUSED"; exit 1; fi
grep -o 'E-INFERENCE-MODEL-MISMATCH' "$work/err" | head -1
printf -- '- the records passed as the model:                 '
if as_parent "$cloister" call --enclave-name inference --part "model=$work/parent/records.sealed" \
   --part "records=$work/parent/records.sealed" --output "$work/parent/x" 2>"$work/err"; then echo "NOT REFUSED"; exit 1; fi
grep -o 'E-WORKLOAD-INPUT' "$work/err" | head -1
printf -- '- the parent tries to open the predictions:        '
if CLOISTER_PRINCIPAL="$role" CLOISTER_PRINCIPAL_KEY="$work/parent/parent.key" \
   as_parent "$cloister" decrypt --in "$work/predictions.sealed" --out "$work/parent/stolen.csv" 2>"$work/err"; then
  echo "OPENED"; exit 1
fi
sed -n 's/^error\[\([A-Z-]*\)\].*/refused (\1)/p' "$work/err" | head -1

cat <<DONE

What was proved
- The model and the records left their owners sealed, each under its owner's KMS
  key; the broker released each data key only to an enclave whose attestation
  document carried the inference image's PCR0, as CiphertextForRecipient.
- The image's measured configuration names the model's SHA-256, so PCR0 says which
  model scores the records: another model was refused even under the right key,
  and a file in the wrong slot was refused before its key was asked for.
- The predictions equal scikit-learn's within 1e-5 and came back sealed under the
  data owner's key; the parent relayed ciphertext and could not open them.
- Either owner alone can stop the next run: the model owner disabled their key and
  the enclave was refused, with the reason.
DONE
