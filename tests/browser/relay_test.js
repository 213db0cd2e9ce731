#!/usr/bin/env node
// Headless Chromium (Debian's /usr/bin/chromium, driven by playwright-core) opens two
// RTCPeerConnections in one page, both with iceTransportPolicy 'relay' and iceServers pointing
// at a TURN server on loopback, exchanges SDP inside the page, opens a data channel and echoes
// messages. Prints one JSON line with what it saw (selected candidate pairs, messages) and exits
// non-zero if the channel did not open, a message went missing or a pair is not relay<->relay.
//
// usage: node relay_test.js --turn HOST:PORT (--user NAME --password PW | --secret S --name NAME)
//                           [--count N] [--timeout-ms MS] [--transport udp|tcp|tls] [--ca FILE]
//
// --transport picks the ICE server URL: turn:HOST:PORT?transport=udp (default),
// turn:HOST:PORT?transport=tcp, or turns:HOST:PORT?transport=tcp (TURN over TLS). With --ca the
// browser runs under a temporary HOME whose NSS database (sql:$HOME/.pki/nssdb, made with
// certutil from libnss3-tools) trusts that CA for TLS servers: that is how Chromium on Linux
// learns a private root. No flag turns certificate checks off, so a certificate that does not
// match HOST makes the turns: server unusable (no relay candidate; the summary says so).
//
// With --secret the TURN REST API credentials are computed here with node's crypto:
// username "<unix-expiry>:<name>", password base64(HMAC-SHA1(secret, username)).

'use strict';

const crypto = require('crypto');
const fs = require('fs');
const os = require('os');
const path = require('path');
const { spawnSync } = require('child_process');
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
  const args = { count: 50, timeoutMs: 30000, transport: 'udp' };
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
      case '--transport': args.transport = value; break;
      case '--ca': args.ca = value; break;
      default: throw new Error(`unknown argument ${key}`);
    }
  }
  if (!args.turn) throw new Error('--turn HOST:PORT is required');
  if (!['udp', 'tcp', 'tls'].includes(args.transport)) throw new Error(`bad --transport ${args.transport}`);
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

function iceUrl(args) {
  switch (args.transport) {
    case 'tcp': return `turn:${args.turn}?transport=tcp`;
    case 'tls': return `turns:${args.turn}?transport=tcp`;
    default: return `turn:${args.turn}?transport=udp`;
  }
}

// A HOME of its own whose NSS database trusts `ca` (a PEM file) for TLS servers.
function homeTrusting(ca) {
  const home = fs.mkdtempSync(path.join(os.tmpdir(), 'turnpike-home-'));
  const db = path.join(home, '.pki', 'nssdb');
  fs.mkdirSync(db, { recursive: true });
  const certutil = (argv) => {
    const r = spawnSync('certutil', argv, { encoding: 'utf8', timeout: 20000 });
    if (r.error) throw new Error(`certutil: ${r.error} (apt-get install -y libnss3-tools; scripts/test.sh does)`);
    if (r.status !== 0) throw new Error(`certutil ${argv.join(' ')}: ${r.stderr}`);
    return r.stdout;
  };
  certutil(['-d', `sql:${db}`, '-N', '--empty-password']);
  certutil(['-d', `sql:${db}`, '-A', '-t', 'C,,', '-n', 'turnpike-test-ca', '-i', ca]);
  const listed = certutil(['-d', `sql:${db}`, '-L']);
  if (!listed.includes('turnpike-test-ca')) throw new Error(`the CA is not in ${db}: ${listed}`);
  return home;
}

async function main() {
  const args = parseArgs(process.argv.slice(2));
  if (!fs.existsSync(CHROMIUM)) {
    throw new Error(`${CHROMIUM} is missing: apt-get install -y chromium (scripts/test.sh does)`);
  }
  const home = args.ca ? homeTrusting(args.ca) : null;
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
      env: home ? { ...process.env, HOME: home } : process.env,
    });
    const page = context.pages()[0] || (await context.newPage());
    page.on('console', (m) => console.error(`page: ${m.text()}`));
    const result = await page.evaluate(pageTest, {
      url: iceUrl(args),
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
    const relays = (list) => list.filter((x) => / typ relay /.test(x)).length;
    // Ports of the relay candidates (candidate-attribute field 6), comma-separated.
    const relayPorts = (list) => list.filter((x) => / typ relay /.test(x)).map((x) => x.split(' ')[5]).join(',');
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
      `transport=${args.transport}`,
      `a_relay_protocol=${(pair(result.selected.a).local || {}).relayProtocol || 'none'}`,
      `b_relay_protocol=${(pair(result.selected.b).local || {}).relayProtocol || 'none'}`,
      `a_relay_candidates=${relays(result.gathered.a)}`,
      `a_relay_ports=${relayPorts(result.gathered.a) || 'none'}`,
      `b_relay_ports=${relayPorts(result.gathered.b) || 'none'}`,
      `b_relay_candidates=${relays(result.gathered.b)}`,
      `candidate_errors=${result.log.filter((l) => l.includes('candidate error')).length}`,
    ].join(' '));
    const relayPair = (p) => p && p.local && p.remote && p.local.type === 'relay' && p.remote.type === 'relay';
    const ok = result.channelOpened && result.received === args.count
      && relayPair(result.selected.a) && relayPair(result.selected.b);
    process.exitCode = ok ? 0 : 1;
  } finally {
    clearTimeout(killer);
    if (context) await context.close().catch(() => {});
    fs.rmSync(userDataDir, { recursive: true, force: true });
    if (home) fs.rmSync(home, { recursive: true, force: true });
  }
}

main().catch((err) => {
  console.error(`relay_test.js: ${err && err.stack ? err.stack : err}`);
  process.exit(2);
});
