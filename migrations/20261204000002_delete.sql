-- Deleted videos: the URI of every video `heimdex delete` (or the retention sweep) removed, and when.
-- A task message enqueued before the delete may still wait in a work, retry or dead-letter queue; the
-- worker would otherwise create the video and its job again from the message (it does so for
-- messages of other publishers). `start_run` acks such a message as superseded: its `enqueued_at` is
-- not after `deleted_at`. A later enqueue of the same URI is newer and runs. One small row per
-- deleted URI, kept (a message can wait in a queue for as long as anyone lets it).
CREATE TABLE deleted_videos (
    uri         text PRIMARY KEY,
    video_id    uuid NOT NULL,
    deleted_at  timestamptz NOT NULL DEFAULT clock_timestamp()
);
