#!/usr/bin/env python3
"""Publish a Heimdex task from Python with pika (the contract: deploy/contract/).

    pip install pika==1.4.4
    python publish_task.py --kind vision --media-uri /srv/heimdex/media/talk.mp4

The message follows deploy/contract/task.schema.json. It is published the way Heimdex's own producer
publishes it: to the exchange named by the prefix (`heimdex`), routing key = the task kind, persistent,
`content_type` application/json, `message_id` = the job id, the attempt header at 1, with publisher
confirms and `mandatory`, so that a message no queue takes is an error here and not lost.

`media_uri` is a path under the workers' media root (absolute, or relative to it) or a URL. Heimdex
identifies a video by its canonical path (symlinks and `..` resolved), so `/media/./talk.mp4`,
`talk.mp4` and `/media/talk.mp4` are one video. When Heimdex
already holds the URI under another video id, or holds a job for (video, kind), its own ids win and
the results are filed under them.

Prints the published message as JSON on stdout.
"""

import argparse
import datetime
import json
import os
import sys
import uuid

import pika

CONTRACT_VERSION = 1
ATTEMPT_HEADER = "x-heimdex-attempt"


def task_message(kind, media_uri, video_id=None, job_id=None, language=None, frame_rate=None):
    """A version-1 task body; absent options take the worker's defaults."""
    options = {}
    if language is not None:
        options["language"] = language
    if frame_rate is not None:
        options["frame_rate"] = frame_rate
    return {
        "v": CONTRACT_VERSION,
        "job_id": str(job_id or uuid.uuid4()),
        "video_id": str(video_id or uuid.uuid4()),
        "kind": kind,
        "media_uri": media_uri,
        "options": options,
        "enqueued_at": datetime.datetime.now(datetime.timezone.utc).isoformat(),
    }


def publish(amqp_url, exchange, message):
    """Publishes one task and waits for the broker's confirm; raises if it was not routed."""
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        properties = pika.BasicProperties(
            content_type="application/json",
            delivery_mode=pika.DeliveryMode.Persistent,
            message_id=message["job_id"],
            timestamp=int(datetime.datetime.now(datetime.timezone.utc).timestamp()),
            headers={ATTEMPT_HEADER: 1},
        )
        # With confirms on, pika raises UnroutableError (no queue bound for the kind) or NackError.
        channel.basic_publish(
            exchange=exchange,
            routing_key=message["kind"],
            body=json.dumps(message).encode("utf-8"),
            properties=properties,
            mandatory=True,
        )
    finally:
        connection.close()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--amqp-url", default=os.environ.get("HEIMDEX_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2F"))
    parser.add_argument("--exchange", default=os.environ.get("HEIMDEX_PREFIX", "heimdex"), help="Heimdex's amqp.prefix")
    parser.add_argument("--kind", choices=["index", "vision"], required=True)
    parser.add_argument("--media-uri", required=True)
    parser.add_argument("--video-id", type=uuid.UUID)
    parser.add_argument("--job-id", type=uuid.UUID)
    parser.add_argument("--language")
    parser.add_argument("--frame-rate", type=float)
    args = parser.parse_args()
    message = task_message(args.kind, args.media_uri, args.video_id, args.job_id, args.language, args.frame_rate)
    try:
        publish(args.amqp_url, args.exchange, message)
    except (pika.exceptions.UnroutableError, pika.exceptions.NackError) as e:
        print(f"publish_task: the broker did not take the message ({e!r}); is the topology declared?", file=sys.stderr)
        return 1
    print(json.dumps(message))
    return 0


if __name__ == "__main__":
    sys.exit(main())
