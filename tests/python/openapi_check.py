"""Checks an OpenAPI document and the answers a server gave against it, independently of the Rust
code that generated both: the document must be a valid OpenAPI 3.1 document (openapi-spec-validator),
and each answer's body must match the schema the document gives for its path, method and status
(jsonschema, draft 2020-12, `$ref`s into the document's components).

usage: openapi_check.py DOCUMENT < answers.json
answers.json: [{"path": "/v1/jobs", "method": "get", "status": 200, "body": {...}}, ...]
Prints one line per answer ("ok" or the first error) and exits 1 if any answer or the document fails.
"""
import json
import sys

import jsonschema
from openapi_spec_validator import validate

doc = json.load(open(sys.argv[1]))
validate(doc)
failed = False
for answer in json.load(sys.stdin):
    responses = doc["paths"][answer["path"]][answer["method"]]["responses"]
    response = responses.get(str(answer["status"])) or responses["default"]
    schema = response["content"]["application/json"]["schema"]
    root = {"$schema": "https://json-schema.org/draft/2020-12/schema", "components": doc["components"], **schema}
    errors = list(jsonschema.Draft202012Validator(root, format_checker=jsonschema.FormatChecker()).iter_errors(answer["body"]))
    where = f'{answer["method"].upper()} {answer["path"]} {answer["status"]}'
    if errors:
        failed = True
        print(f"{where}: {errors[0].message} at {list(errors[0].absolute_path)}")
    else:
        print(f"{where}: ok")
sys.exit(1 if failed else 0)
