"""Calls AWS IoT Secure Tunneling operations through boto3, unchanged but for endpoint_url and
keys, and prints each outcome as one JSON line: {"ok": response} or {"error": {...}} with the
exception class botocore raised. Driven by tests/vendor_aws.rs.

usage: aws_call.py '[["open_tunnel", {...}], ["describe_tunnel", {...}], ...]'
env:   IOTUNNEL_ENDPOINT (http://127.0.0.1:PORT), AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
       AWS_REGION, and optionally AWS_SESSION_TOKEN.
"""
import datetime
import json
import os
import sys

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError


def plain(value):
    if isinstance(value, datetime.datetime):
        return {"epoch": value.timestamp()}
    raise TypeError(f"cannot encode {type(value)}")


def main():
    client = boto3.client(
        "iotsecuretunneling",
        endpoint_url=os.environ["IOTUNNEL_ENDPOINT"],
        region_name=os.environ.get("AWS_REGION", "us-east-1"),
        aws_access_key_id=os.environ["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=os.environ["AWS_SECRET_ACCESS_KEY"],
        aws_session_token=os.environ.get("AWS_SESSION_TOKEN"),
        # One attempt: an error must come back as it was answered, not after retries.
        config=Config(retries={"total_max_attempts": 1}),
    )
    for operation, params in json.loads(sys.argv[1]):
        try:
            response = getattr(client, operation)(**params)
            response.pop("ResponseMetadata", None)
            out = {"ok": response}
        except ClientError as e:
            code = e.response["Error"]["Code"]
            modeled = getattr(client.exceptions, code, None)
            out = {
                "error": {
                    "class": type(e).__name__,
                    "code": code,
                    "message": e.response["Error"].get("Message", ""),
                    "status": e.response["ResponseMetadata"]["HTTPStatusCode"],
                    "modeled": modeled is not None and isinstance(e, modeled),
                }
            }
        print(json.dumps(out, default=plain), flush=True)


if __name__ == "__main__":
    main()
