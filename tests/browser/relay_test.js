#!/usr/bin/env node
// Headless Chromium (Debian's /usr/bin/chromium, driven by playwright-core) opens two
// RTCPeerConnections in one page, both with iceTransportPolicy 'relay' and iceServers pointing
// at a TURN server on loopback, exchanges SDP inside the page, opens a data channel and echoes
// messages. Prints one JSON line with what it saw (selected candidate pairs, messages) and exits
// non-zero if the channel did not open, a message went missing or a pair is not relay<->relay.
//
// usage: node relay_test.js --turn 127.0.0.1:PORT (--user NAME --password PW | --secret S --name NAME)
//                           [--count N] [--timeout-ms MS]
//
// With --secret the TURN REST API credentials are computed here with node's crypto:
// username "<unix-expiry>:<name>", password base64(HMAC-SHA1(secret, username)).

'use strict';

const crypto = require('crypto');
const fs = require('fs');
const os = require('os');
const path = require('path');
const { chromium } = require('playwright-core');

const CHROMIUM = '/usr/bin/chromium';
const FLAGS = [
  '--headless',
  '--no-sandbox',
  '--disable-gpu',
  '--disable-quic',
  '--no-first-run',
  '--disable-background-networking',
  '--disable-component-update',
  '--disable-sync',
  '--allow-loopback-in-peer-connection',
];

function parseArgs(argv) {
  const args = { count: 50, timeoutMs: 30000 };
  for (let i = 0; i < argv.length; i += 2) {
    const key = argv[i];
    const value = argv[i + 1];
    if (value === undefined) throw new Error(`missing value for ${key}`);
    switch (key) {
      case '--turn': args.turn = value; break;
      case '--user': args.user = value; break;
      case '--password': args.password = value; break;
      case '--secret': args.secret = value; break;
      case '--name': args.name = value; break;
      case '--count': args.count = parseInt(value, 10); break;
      case '--timeout-ms': args.timeoutMs = parseInt(value, 10); break;
      default: throw new Error(`unknown argument ${key}`);
    }
  }
  if (!args.turn) throw new Error('--turn HOST:PORT is required');
  if (args.secret) {
    const name = args.name || 'browser';
    const expiry = Math.floor(Date.now() / 1000) + 3600;
    args.user = `${expiry}:${name}`;
    args.password = crypto.createHmac('sha1', args.secret).update(args.user).digest('base64');
    args.credentials = 'rest-api';
  } else {
    if (!args.user || !args.password) throw new Error('--user and --password (or --secret) are required');
    args.credentials = 'static';
  }
  return args;
}

// Runs inside the page: everything WebRTC happens here, no signalling server.
async function pageTest({ url, username, credential, count, timeoutMs }) {
  const deadline = Date.now() + timeoutMs;
  const log = [];
  const config = {
    iceServers: [{ urls: [url], username, credential }],
    iceTransportPolicy: 'relay',
  };
  const a = new RTCPeerConnection(config);
  const b = new RTCPeerConnection(config);
  const gathered = { a: [], b: [] };
  // Trickle candidates straight into the other connection.
  a.onicecandidate = (e) => {
    if (e.candidate) {
      gathered.a.push(e.candidate.candidate);
      b.addIceCandidate(e.candidate).catch((err) => log.push(`b.addIceCandidate: ${err}`));
    }
  };
  b.onicecandidate = (e) => {
    if (e.candidate) {
      gathered.b.push(e.candidate.candidate);
      a.addIceCandidate(e.candidate).catch((err) => log.push(`a.addIceCandidate: ${err}`));
    }
  };
  a.onicecandidateerror = (e) => log.push(`a candidate error ${e.errorCode} ${e.errorText} ${e.url}`);
  b.onicecandidateerror = (e) => log.push(`b candidate error ${e.errorCode} ${e.errorText} ${e.url}`);

  // b echoes every message back on the channel it is offered.
  b.ondatachannel = (e) => {
    const ch = e.channel;
    ch.onmessage = (m) => ch.send(m.data);
  };

  const channel = a.createDataChannel('echo', { ordered: true });
  const opened = new Promise((resolve, reject) => {
    channel.onopen = () => resolve(Date.now());
    channel.onerror = (e) => reject(new Error(`channel error: ${e.error}`));
  });
  const received = new Set();
  let allBack;
  const allBackPromise = new Promise((resolve) => { allBack = resolve; });
  channel.onmessage = (m) => {
    received.add(m.data);
    if (received.size === count) allBack();
  };

  const started = Date.now();
  const offer = await a.createOffer();
  await a.setLocalDescription(offer);
  await b.setRemoteDescription(offer);
  const answer = await b.createAnswer();
  await b.setLocalDescription(answer);
  await a.setRemoteDescription(answer);

  const timeout = (what) => new Promise((_, reject) => {
    setTimeout(() => reject(new Error(`timed out waiting for ${what}`)), Math.max(0, deadline - Date.now()));
  });
  const result = { gathered, log, channelOpened: false, sent: count, received: 0 };
  try {
    const openedAt = await Promise.race([opened, timeout('the data channel to open')]);
    result.channelOpened = true;
    result.openMs = openedAt - started;
    const sent = [];
    for (let i = 0; i < count; i++) {
      const msg = `turnpike-echo-${i}-${'x'.repeat(i % 7 * 100)}`;
      sent.push(msg);
      channel.send(msg);
    }
    await Promise.race([allBackPromise, timeout('the echoes')]);
    result.received = sent.filter((m) => received.has(m)).length;
    result.echoMs = Date.now() - openedAt;
  } catch (err) {
    result.error = String(err);
    result.received = received.size;
  }

  // The selected pair on each side, from getStats.
  async function selected(pc) {
    const stats = await pc.getStats();
    const byId = new Map();
    stats.forEach((s) => byId.set(s.id, s));
    let pair = null;
    stats.forEach((s) => {
      if (s.type === 'transport' && s.selectedCandidatePairId) pair = byId.get(s.selectedCandidatePairId);
    });
    if (!pair) {
      stats.forEach((s) => {
        if (s.type === 'candidate-pair' && s.nominated && s.state === 'succeeded') pair = s;
      });
    }
    if (!pair) return null;
    const cand = (c) => c && {
      type: c.candidateType,
      address: c.address,
      port: c.port,
      protocol: c.protocol,
      relayProtocol: c.relayProtocol,
      url: c.url,
    };
    return {
      state: pair.state,
      nominated: pair.nominated,
      bytesSent: pair.bytesSent,
      bytesReceived: pair.bytesReceived,
      local: cand(byId.get(pair.localCandidateId)),
      remote: cand(byId.get(pair.remoteCandidateId)),
    };
  }
  result.selected = { a: await selected(a), b: await selected(b) };
  result.iceState = { a: a.iceConnectionState, b: b.iceConnectionState };
  channel.close();
  a.close();
  b.close();
  return result;
}

async function main() {
  const args = parseArgs(process.argv.slice(2));
  if (!fs.existsSync(CHROMIUM)) {
    throw new Error(`${CHROMIUM} is missing: apt-get install -y chromium (scripts/test.sh does)`);
  }
  const userDataDir = fs.mkdtempSync(path.join(os.tmpdir(), 'turnpike-chromium-'));
  let context;
  const killer = setTimeout(() => {
    console.error('relay_test.js: overall timeout');
    process.exit(3);
  }, args.timeoutMs + 20000);
  try {
    // launchPersistentContext is how playwright takes a --user-data-dir (a fresh one here).
    context = await chromium.launchPersistentContext(userDataDir, {
      executablePath: CHROMIUM,
      headless: true,
      args: FLAGS,
      timeout: 20000,
    });
    const page = context.pages()[0] || (await context.newPage());
    page.on('console', (m) => console.error(`page: ${m.text()}`));
    const result = await page.evaluate(pageTest, {
      url: `turn:${args.turn}?transport=udp`,
      username: args.user,
      credential: args.password,
      count: args.count,
      timeoutMs: args.timeoutMs,
    });
    result.credentials = args.credentials;
    result.username = args.user;
    result.browser = context.browser() ? context.browser().version() : null;
    console.log(JSON.stringify(result));
    // One flat key=value line for the Rust test (tests/it/browser.rs), which has no JSON parser.
    const c = (x) => (x ? `${x.type}:${x.address}:${x.port}` : 'none');
    const pair = (p) => p || {};
    console.log([
      'SUMMARY',
      `credentials=${args.credentials}`,
      `opened=${result.channelOpened}`,
      `sent=${args.count}`,
      `received=${result.received}`,
      `a_local=${c(pair(result.selected.a).local)}`,
      `a_remote=${c(pair(result.selected.a).remote)}`,
      `b_local=${c(pair(result.selected.b).local)}`,
      `b_remote=${c(pair(result.selected.b).remote)}`,
      `a_url=${(pair(result.selected.a).local || {}).url || 'none'}`,
      `b_url=${(pair(result.selected.b).local || {}).url || 'none'}`,
      `a_bytes_sent=${pair(result.selected.a).bytesSent || 0}`,
      `b_bytes_sent=${pair(result.selected.b).bytesSent || 0}`,
      `ice=${result.iceState.a}/${result.iceState.b}`,
    ].join(' '));
    const relayPair = (p) => p && p.local && p.remote && p.local.type === 'relay' && p.remote.type === 'relay';
    const ok = result.channelOpened && result.received === args.count
      && relayPair(result.selected.a) && relayPair(result.selected.b);
    process.exitCode = ok ? 0 : 1;
  } finally {
    clearTimeout(killer);
    if (context) await context.close().catch(() => {});
    fs.rmSync(userDataDir, { recursive: true, force: true });
  }
}

main().catch((err) => {
  console.error(`relay_test.js: ${err && err.stack ? err.stack : err}`);
  process.exit(2);
});
