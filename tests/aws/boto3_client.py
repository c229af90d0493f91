"""Drives Cloister's AWS KMS API with boto3, unchanged, as an application
written for AWS KMS would: only the endpoint, the CA bundle and the access key
differ. Reads its settings from the JSON file named on the command line and
prints what it saw as one JSON object (tests/cli_kms.rs checks it)."""

import json
import sys

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError, SSLError


def refusal(call):
    """The AWS error code, message and HTTP status of a call that must fail."""
    try:
        call()
    except ClientError as e:
        err = e.response["Error"]
        return [err["Code"], err["Message"], e.response["ResponseMetadata"]["HTTPStatusCode"]]
    return None


def main():
    cfg = json.load(open(sys.argv[1]))

    def client(access_key_id, secret, verify=cfg["ca"]):
        return boto3.client(
            "kms",
            endpoint_url=cfg["endpoint"],
            region_name=cfg["region"],
            verify=verify,
            aws_access_key_id=access_key_id,
            aws_secret_access_key=secret,
            config=Config(retries={"max_attempts": 1}),
        )

    kms = client(cfg["access_key_id"], cfg["secret_access_key"])
    out = {}

    key = kms.create_key(Description="boto3 round trip")["KeyMetadata"]
    key_id = key["KeyId"]
    out["created"] = {k: key[k] for k in ("KeyId", "Arn", "KeyState", "Enabled", "KeySpec")}
    out["creation_date_type"] = type(key["CreationDate"]).__name__
    kms.create_alias(AliasName="alias/boto3", TargetKeyId=key_id)
    context = {"purpose": "boto3"}
    enc = kms.encrypt(KeyId="alias/boto3", Plaintext=b"hello from boto3", EncryptionContext=context)
    dec = kms.decrypt(CiphertextBlob=enc["CiphertextBlob"], EncryptionContext=context)
    out["round_trip"] = dec["Plaintext"].decode()
    out["decrypt_key_id"] = dec["KeyId"]
    out["wrong_context"] = refusal(lambda: kms.decrypt(CiphertextBlob=enc["CiphertextBlob"]))
    re = kms.re_encrypt(
        CiphertextBlob=enc["CiphertextBlob"],
        SourceEncryptionContext=context,
        DestinationKeyId=key_id,
    )
    out["re_encrypted"] = kms.decrypt(CiphertextBlob=re["CiphertextBlob"])["Plaintext"].decode()
    dk = kms.generate_data_key(KeyId=key_id, KeySpec="AES_256")
    out["data_key_len"] = len(dk["Plaintext"])
    out["data_key_opens"] = kms.decrypt(CiphertextBlob=dk["CiphertextBlob"])["Plaintext"] == dk["Plaintext"]
    wp = kms.generate_data_key_without_plaintext(KeyId=key_id, NumberOfBytes=64)
    out["without_plaintext"] = sorted(wp.keys() - {"ResponseMetadata"})
    out["random_len"] = len(kms.generate_random(NumberOfBytes=48)["Plaintext"])
    paginator = kms.get_paginator("list_keys")
    out["listed_keys"] = [
        k["KeyId"] for page in paginator.paginate(PaginationConfig={"PageSize": 1}) for k in page["Keys"]
    ]
    out["aliases"] = [a["AliasName"] for a in kms.list_aliases(KeyId=key_id)["Aliases"]]
    kms.enable_key_rotation(KeyId=key_id, RotationPeriodInDays=180)
    status = kms.get_key_rotation_status(KeyId=key_id)
    out["rotation"] = [status["KeyRotationEnabled"], status.get("RotationPeriodInDays")]
    kms.disable_key(KeyId=key_id)
    out["disabled"] = refusal(lambda: kms.encrypt(KeyId=key_id, Plaintext=b"x"))
    kms.enable_key(KeyId=key_id)
    out["deletion_state"] = kms.schedule_key_deletion(KeyId=key_id, PendingWindowInDays=7)["KeyState"]
    out["cancelled"] = kms.cancel_key_deletion(KeyId=key_id)["KeyId"]
    out["after_cancel"] = kms.describe_key(KeyId=key_id)["KeyMetadata"]["KeyState"]
    kms.delete_alias(AliasName="alias/boto3")
    out["not_found"] = refusal(lambda: kms.describe_key(KeyId="alias/boto3"))

    # The key of an enclave's data, made by the key administrator under the
    # key policy that works at AWS too; the parent role (kms) may have data
    # keys only for the enclave.
    admin = client(cfg["admin_access_key_id"], cfg["admin_secret_access_key"])
    policy = open(cfg["policy"]).read()
    attested = admin.create_key(Policy=policy, Description="enclave data keys")["KeyMetadata"]["KeyId"]
    stored = admin.get_key_policy(KeyId=attested, PolicyName="default")["Policy"]
    out["policy_round_trip"] = json.loads(stored) == json.loads(policy)
    # The parent cannot replace the policy to drop the pin.
    out["parent_put_policy"] = refusal(
        lambda: kms.put_key_policy(KeyId=attested, PolicyName="default", Policy=stored.replace("Decrypt", "Encrypt"))
    )
    recipient = {
        "KeyEncryptionAlgorithm": "RSAES_OAEP_SHA_256",
        "AttestationDocument": open(cfg["attestation_document"], "rb").read(),
    }
    generated = kms.generate_data_key(KeyId=attested, KeySpec="AES_256", Recipient=recipient)
    out["recipient_members"] = sorted(generated.keys() - {"ResponseMetadata"})
    open(cfg["cms_generated"], "wb").write(generated["CiphertextForRecipient"])
    open(cfg["attested_blob"], "wb").write(generated["CiphertextBlob"])
    decrypted = kms.decrypt(CiphertextBlob=generated["CiphertextBlob"], Recipient=recipient)
    out["decrypt_recipient_members"] = sorted(decrypted.keys() - {"ResponseMetadata"})
    open(cfg["cms_decrypted"], "wb").write(decrypted["CiphertextForRecipient"])
    # Without an attestation document, the same principal is refused.
    out["denied"] = refusal(lambda: kms.decrypt(CiphertextBlob=generated["CiphertextBlob"]))

    # Signatures: a wrong secret, an access key never issued.
    wrong = "x" + cfg["secret_access_key"][1:]
    out["bad_signature"] = refusal(lambda: client(cfg["access_key_id"], wrong).list_keys())
    out["unknown_key"] = refusal(lambda: client("AKCLNOTISSUEDBYTHEM0", cfg["secret_access_key"]).list_keys())
    # TLS: a client that trusts only the public CAs does not talk to the broker.
    try:
        client(cfg["access_key_id"], cfg["secret_access_key"], verify=True).list_keys()
        out["untrusted_tls"] = None
    except SSLError:
        out["untrusted_tls"] = "SSLError"
    print(json.dumps(out))


if __name__ == "__main__":
    main()
