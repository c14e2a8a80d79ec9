// A blobstore client in Node.js built from storage.proto alone, with @grpc/grpc-js and
// @grpc/proto-loader: no generated code, no Python. Run by tests/polyglot/test_node_client.py:
//
//   node client.js HOST:PORT PATH/TO/protos [SIZE_MIB]
//
// Sets and gets a small value, streams a SIZE_MIB (default 50) upload and download with a
// CRC32C on every message and whole-object CRC32C and SHA-256 checks, lists, and checks that a
// missing key is NOT_FOUND with its reason. Prints one JSON line with what it did; exits 1 on
// the first failure.
'use strict';

const crypto = require('node:crypto');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const [address, protoRoot, sizeArg] = process.argv.slice(2);
const MIB = 1 << 20;
const TOTAL = Number(sizeArg || 50) * MIB;
const CHUNK = MIB;

// CRC32C (Castagnoli), reflected polynomial 0x82F63B78, as the wire protocol uses it.
const CRC_TABLE = (() => {
  const table = new Uint32Array(256);
  for (let n = 0; n < 256; n++) {
    let c = n;
    for (let k = 0; k < 8; k++) c = c & 1 ? (c >>> 1) ^ 0x82f63b78 : c >>> 1;
    table[n] = c >>> 0;
  }
  return table;
})();

function crc32c(buffer, previous = 0) {
  let crc = ~previous >>> 0;
  for (let i = 0; i < buffer.length; i++) crc = CRC_TABLE[(crc ^ buffer[i]) & 0xff] ^ (crc >>> 8);
  return ~crc >>> 0;
}

function check(condition, message) {
  if (!condition) throw new Error(message);
}

// Deterministic bytes, distinct per chunk: a SHA-256 counter-mode base with the index stamped in.
const BASE = Buffer.concat(
  Array.from({ length: CHUNK / 32 }, (_, block) => crypto.createHash('sha256').update(`base:${block}`).digest()),
);

function piece(index, size) {
  const out = Buffer.from(BASE.subarray(0, size));
  out.writeUInt32BE(index, 0);
  return out;
}

const definition = protoLoader.loadSync('blobstore/v1/storage.proto', {
  includeDirs: [protoRoot],
  keepCase: true,
  longs: Number,
  enums: String,
  defaults: true,
  oneofs: true,
});
const { Storage } = grpc.loadPackageDefinition(definition).blobstore.v1;
const client = new Storage(address, grpc.credentials.createInsecure(), {
  'grpc.max_receive_message_length': 8 * MIB,
  'grpc.max_send_message_length': 8 * MIB,
});

const unary = (method, request) =>
  new Promise((resolve, reject) =>
    client[method](request, (error, response) => (error ? reject(error) : resolve(response))),
  );

async function setAndGet() {
  const value = Buffer.from('Hello from Node.js');
  const set = await unary('Set', {
    key: 'node/hello',
    value,
    content_type: 'text/plain',
    crc32c: crc32c(value),
  });
  check(set.object.size === value.length, `Set reported size ${set.object.size}`);
  const got = await unary('Get', { key: 'node/hello' });
  check(Buffer.compare(got.value, value) === 0, 'Get returned other bytes');
  check(got.object.checksums.crc32c === crc32c(value), 'Get: CRC32C differs');
  check(got.object.content_type === 'text/plain', 'Get: content type lost');
}

async function upload(key) {
  let call;
  const answered = new Promise((resolve, reject) => {
    call = client.Upload((error, response) => (error ? reject(error) : resolve(response)));
  });
  let whole = 0;
  const sha = crypto.createHash('sha256');
  for (let offset = 0, index = 0; offset < TOTAL; offset += CHUNK, index++) {
    const data = piece(index, Math.min(CHUNK, TOTAL - offset));
    whole = crc32c(data, whole);
    sha.update(data);
    const message = { write_offset: offset, data, crc32c: crc32c(data) };
    if (offset === 0) message.spec = { key, content_type: 'application/octet-stream', size: TOTAL };
    // Respect flow control; a server that failed the call ends the wait with its error.
    if (!call.write(message)) await Promise.race([new Promise((resume) => call.once('drain', resume)), answered]);
  }
  const sha256 = sha.digest();
  call.write({ write_offset: TOTAL, finish_write: true, object_checksums: { crc32c: whole, sha256 } });
  call.end();
  return { response: await answered, whole, sha256 };
}

function download(key) {
  return new Promise((resolve, reject) => {
    let whole = 0;
    let received = 0;
    let messages = 0;
    let object = null;
    const sha = crypto.createHash('sha256');
    const call = client.Download({ key });
    call.on('data', (message) => {
      if (message.object) object = object || message.object;
      if (crc32c(message.data) !== message.crc32c) {
        call.cancel();
        reject(new Error(`Download: message ${messages} failed its CRC32C`));
        return;
      }
      whole = crc32c(message.data, whole);
      sha.update(message.data);
      received += message.data.length;
      messages += 1;
    });
    call.on('error', reject);
    call.on('end', () => resolve({ object, whole, received, messages, sha256: sha.digest() }));
  });
}

async function main() {
  await setAndGet();

  const up = await upload('node/big');
  const stored = up.response.object;
  check(stored.size === TOTAL, `Upload stored ${stored.size} bytes, not ${TOTAL}`);
  check(stored.checksums.crc32c === up.whole, 'Upload: server CRC32C differs from ours');
  check(Buffer.compare(stored.checksums.sha256, up.sha256) === 0, 'Upload: server SHA-256 differs from ours');

  const down = await download('node/big');
  check(down.received === TOTAL, `Download returned ${down.received} bytes`);
  check(down.whole === up.whole, 'Download: whole-object CRC32C differs from the upload');
  check(down.object.checksums.crc32c === down.whole, 'Download: CRC32C differs from the object metadata');
  check(Buffer.compare(down.sha256, up.sha256) === 0, 'Download: SHA-256 differs from the upload');

  const listed = await unary('List', { prefix: 'node/' });
  const keys = listed.objects.map((object) => object.key);
  check(JSON.stringify(keys) === JSON.stringify(['node/big', 'node/hello']), `List returned ${keys}`);

  let missing = null;
  try {
    await unary('Get', { key: 'node/missing' });
  } catch (error) {
    missing = error;
  }
  check(missing && missing.code === grpc.status.NOT_FOUND, `missing key: ${missing && missing.code}`);
  check(missing.metadata.get('blobstore-error-reason')[0] === 'NOT_FOUND', 'missing key: no reason trailer');

  console.log(
    JSON.stringify({
      ok: true,
      uploaded_bytes: stored.size,
      download_messages: down.messages,
      crc32c: up.whole,
      sha256: up.sha256.toString('hex'),
      keys,
    }),
  );
}

main()
  .then(() => client.close())
  .catch((error) => {
    console.error(`node client failed: ${error.stack || error}`);
    process.exit(1);
  });
