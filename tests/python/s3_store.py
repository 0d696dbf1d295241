"""A real S3-compatible store for tests/tests/s3.rs: moto's server (from PyPI, in .deps/venv) on a
free loopback port, set up through its own APIs with boto3, then made to check every request's
SigV4 signature and IAM permissions as AWS does.

    s3_store.py BUCKET [KEY=FILE ...]

Creates BUCKET holding each FILE under KEY, an IAM user `reader` allowed to read objects and list
buckets, and a user `stranger` allowed nothing, each with an access key; then turns authentication on
and prints one JSON line: {"endpoint", "reader": [id, secret], "stranger": [id, secret]}. It serves
until its standard input closes (the test dropping it) and exits then.
"""

import json
import logging
import sys

import boto3
from moto import settings
from moto.core.authorization import ActionAuthenticatorMixin
from moto.server import ThreadedMotoServer

logging.getLogger("werkzeug").setLevel(logging.WARNING)

bucket, objects = sys.argv[1], [a.split("=", 1) for a in sys.argv[2:]]
server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
server.start()
host, port = server.get_host_and_port()
endpoint = f"http://{host}:{port}"
# Set-up runs before authentication is on; these credentials are not checked.
session = boto3.session.Session(aws_access_key_id="setup", aws_secret_access_key="setup", region_name="us-east-1")
iam = session.client("iam", endpoint_url=endpoint)
s3 = session.client("s3", endpoint_url=endpoint)


def user(name, actions):
    iam.create_user(UserName=name)
    if actions:
        policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": actions, "Resource": "*"}]}
        iam.put_user_policy(UserName=name, PolicyName="read", PolicyDocument=json.dumps(policy))
    key = iam.create_access_key(UserName=name)["AccessKey"]
    return [key["AccessKeyId"], key["SecretAccessKey"]]


reader = user("reader", ["s3:GetObject", "s3:ListBucket"])
stranger = user("stranger", [])
s3.create_bucket(Bucket=bucket)
for key, path in objects:
    with open(path, "rb") as f:
        s3.put_object(Bucket=bucket, Key=key, Body=f.read())
# From here on every request must be signed by a known key with the right secret and be allowed.
# (What moto's POST /moto-api/reset-auth does, in this process.)
settings.INITIAL_NO_AUTH_ACTION_COUNT = 0
ActionAuthenticatorMixin.request_count = 0
print(json.dumps({"endpoint": endpoint, "reader": reader, "stranger": stranger}), flush=True)
sys.stdin.read()
server.stop()
