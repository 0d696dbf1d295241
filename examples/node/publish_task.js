#!/usr/bin/env node
// Publish a Heimdex task from Node with amqplib (the contract: deploy/contract/).
//
//   npm install            # amqplib, pinned in package.json
//   node publish_task.js --kind vision --media-uri /srv/heimdex/media/talk.mp4
//
// The message follows deploy/contract/task.schema.json and is published as Heimdex's own producer
// publishes it: exchange = the prefix (`heimdex`), routing key = the kind, persistent, content type
// application/json, message id = the job id, attempt header 1, on a confirm channel with `mandatory`
// so that a message no queue takes is an error here. `media_uri` is a path under the media root
// (absolute or relative to it) or a URL; Heimdex identifies a video by its canonical path. Prints the published message as JSON.
'use strict';

const crypto = require('node:crypto');
const { parseArgs } = require('node:util');
const amqplib = require('amqplib');

const CONTRACT_VERSION = 1;
const ATTEMPT_HEADER = 'x-heimdex-attempt';

function taskMessage({ kind, mediaUri, videoId, jobId, language, frameRate }) {
  const options = {};
  if (language !== undefined) options.language = language;
  if (frameRate !== undefined) options.frame_rate = frameRate;
  return {
    v: CONTRACT_VERSION,
    job_id: jobId ?? crypto.randomUUID(),
    video_id: videoId ?? crypto.randomUUID(),
    kind,
    media_uri: mediaUri,
    options,
    enqueued_at: new Date().toISOString(),
  };
}

async function publish(amqpUrl, exchange, message) {
  const connection = await amqplib.connect(amqpUrl);
  try {
    const channel = await connection.createConfirmChannel();
    let returned = null;
    // The broker returns a mandatory message that no queue is bound for, before it confirms it.
    channel.on('return', (msg) => { returned = msg.fields.replyText; });
    channel.publish(exchange, message.kind, Buffer.from(JSON.stringify(message)), {
      persistent: true,
      contentType: 'application/json',
      messageId: message.job_id,
      timestamp: Math.floor(Date.now() / 1000),
      headers: { [ATTEMPT_HEADER]: 1 },
      mandatory: true,
    });
    await channel.waitForConfirms();
    if (returned !== null) {
      throw new Error(`the broker did not route the message (${returned}); is the topology declared?`);
    }
    await channel.close();
  } finally {
    await connection.close();
  }
}

async function main() {
  const { values } = parseArgs({
    options: {
      'amqp-url': { type: 'string', default: process.env.HEIMDEX_AMQP_URL ?? 'amqp://guest:guest@127.0.0.1:5672/%2F' },
      exchange: { type: 'string', default: process.env.HEIMDEX_PREFIX ?? 'heimdex' },
      kind: { type: 'string' },
      'media-uri': { type: 'string' },
      'video-id': { type: 'string' },
      'job-id': { type: 'string' },
      language: { type: 'string' },
      'frame-rate': { type: 'string' },
    },
  });
  if (!['index', 'vision'].includes(values.kind) || !values['media-uri']) {
    console.error('usage: publish_task.js --kind index|vision --media-uri URI [--video-id UUID] [--job-id UUID] [--language L] [--frame-rate R]');
    return 2;
  }
  const message = taskMessage({
    kind: values.kind,
    mediaUri: values['media-uri'],
    videoId: values['video-id'],
    jobId: values['job-id'],
    language: values.language,
    frameRate: values['frame-rate'] === undefined ? undefined : Number(values['frame-rate']),
  });
  await publish(values['amqp-url'], values.exchange, message);
  console.log(JSON.stringify(message));
  return 0;
}

main().then((code) => { process.exitCode = code; }, (err) => {
  console.error(`publish_task: ${err.message}`);
  process.exitCode = 1;
});
