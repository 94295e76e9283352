"""Calls Alibaba IoT Platform tunnel actions through the alibabacloud_iot20180120 SDK, unchanged
but for the endpoint and keys, and prints each outcome as one JSON line: {"ok": body} or
{"error": {...}} with the exception class the SDK raised. Driven by tests/vendor_aliyun.rs.

usage: aliyun_call.py '[["CreateDeviceTunnel", {"product_key": ...}], ...]'
env:   IOTUNNEL_ENDPOINT (127.0.0.1:PORT), ALIBABA_KEY_ID, ALIBABA_KEY_SECRET,
       IOTUNNEL_SIGNATURE (acs3: the SDK's default ACS3-HMAC-SHA256; sha1: the RPC HMAC-SHA1
       signature, signature_algorithm='v2').
"""
import json
import os
import re
import sys

from alibabacloud_iot20180120 import models
from alibabacloud_iot20180120.client import Client
from alibabacloud_tea_openapi import models as open_api_models
from alibabacloud_tea_util import models as util_models


def snake(name):
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def main():
    config = open_api_models.Config(
        access_key_id=os.environ["ALIBABA_KEY_ID"],
        access_key_secret=os.environ["ALIBABA_KEY_SECRET"],
        endpoint=os.environ["IOTUNNEL_ENDPOINT"],
        protocol="http",
        region_id="cn-shanghai",
    )
    if os.environ.get("IOTUNNEL_SIGNATURE") == "sha1":
        config.signature_algorithm = "v2"
    client = Client(config)
    # One attempt: an error must come back as it was answered.
    runtime = util_models.RuntimeOptions(autoretry=False, max_attempts=0)
    for action, params in json.loads(sys.argv[1]):
        request = getattr(models, action + "Request")(**params)
        try:
            response = getattr(client, snake(action) + "_with_options")(request, runtime)
            out = {"ok": response.body.to_map(), "status": response.status_code}
        except Exception as e:  # the SDK's ClientException / ServerException
            out = {
                "error": {
                    "class": type(e).__name__,
                    "code": getattr(e, "code", None),
                    "message": getattr(e, "message", str(e)),
                    "status": getattr(e, "status_code", None),
                }
            }
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
