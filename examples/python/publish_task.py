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

With `--wait` it also waits for the job's event (deploy/contract/event.schema.json): before publishing
it binds a private queue to the `<prefix>.events` topic exchange with routing key `<kind>.*`, then
reads events until the one that carries its `external_id` (the job id when none is given: Heimdex may
run the task under a job id of its own, but it always sends the caller's fields back), prints it as a
second line, and exits 0 when the job succeeded, 1 when it failed or died, 2 when none came in time.

    python publish_task.py --kind vision --media-uri talk.mp4 --external-id order-7 --wait
"""

import argparse
import datetime
import json
import os
import sys
import time
import uuid

import pika

CONTRACT_VERSION = 1
ATTEMPT_HEADER = "x-heimdex-attempt"


def task_message(kind, media_uri, video_id=None, job_id=None, language=None, frame_rate=None, external_id=None, metadata=None):
    """A version-1 task body; absent options take the worker's defaults, absent caller fields are left out."""
    options = {}
    if language is not None:
        options["language"] = language
    if frame_rate is not None:
        options["frame_rate"] = frame_rate
    message = {
        "v": CONTRACT_VERSION,
        "job_id": str(job_id or uuid.uuid4()),
        "video_id": str(video_id or uuid.uuid4()),
        "kind": kind,
        "media_uri": media_uri,
        "options": options,
        "enqueued_at": datetime.datetime.now(datetime.timezone.utc).isoformat(),
    }
    if external_id is not None:
        message["external_id"] = external_id  # 1 to 256 characters
    if metadata is not None:
        message["metadata"] = metadata  # a JSON object, at most 8 KiB
    return message


def subscribe(channel, exchange, kind):
    """A private queue bound to the events exchange for every final state of `kind`; its name."""
    queue = channel.queue_declare(queue="", exclusive=True, auto_delete=True).method.queue
    channel.queue_bind(queue=queue, exchange=f"{exchange}.events", routing_key=f"{kind}.*")
    return queue


def wait_for_event(channel, queue, external_id, timeout_s):
    """The first event that carries `external_id`, or None after `timeout_s` seconds.

    Events are delivered at least once: a consumer that acts on them drops copies by `event_id`."""
    deadline = time.monotonic() + timeout_s
    for method, _properties, body in channel.consume(queue, auto_ack=True, inactivity_timeout=0.5):
        if method is not None:
            event = json.loads(body)
            if event.get("external_id") == external_id:
                return event
        if time.monotonic() > deadline:
            return None
    return None


def publish(amqp_url, exchange, message, wait_s=None):
    """Publishes one task and waits for the broker's confirm; raises if it was not routed. With `wait_s`,
    then waits that long for the job's event and returns it (None when none came)."""
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        channel = connection.channel()
        # Subscribe before publishing, so that an event of a job that ends at once is not missed.
        queue = subscribe(channel, exchange, message["kind"]) if wait_s is not None else None
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
        if queue is None:
            return None
        return wait_for_event(channel, queue, message["external_id"], wait_s)
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
    parser.add_argument("--external-id", help="your own id for the job (1 to 256 characters)")
    parser.add_argument("--metadata", type=json.loads, help="your own JSON object for the job (at most 8 KiB)")
    parser.add_argument("--wait", action="store_true", help="wait for the job's event and print it")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds to wait for the event")
    args = parser.parse_args()
    job_id = args.job_id or uuid.uuid4()
    external_id = args.external_id or (str(job_id) if args.wait else None)
    message = task_message(
        args.kind, args.media_uri, args.video_id, job_id, args.language, args.frame_rate, external_id, args.metadata
    )
    try:
        event = publish(args.amqp_url, args.exchange, message, args.timeout if args.wait else None)
    except (pika.exceptions.UnroutableError, pika.exceptions.NackError, pika.exceptions.ChannelClosedByBroker) as e:
        print(f"publish_task: the broker did not take the message ({e!r}); is the topology declared?", file=sys.stderr)
        return 1
    print(json.dumps(message), flush=True)
    if not args.wait:
        return 0
    if event is None:
        print(f"publish_task: no event for external_id {external_id!r} within {args.timeout} s", file=sys.stderr)
        return 2
    print(json.dumps(event))
    return 0 if event["status"] == "succeeded" else 1


if __name__ == "__main__":
    sys.exit(main())
