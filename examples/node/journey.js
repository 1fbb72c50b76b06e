#!/usr/bin/env node
// The whole session-broker journey from Node.js, against a real `session-broker dev` process.
//
// Starts the broker on free loopback ports, reads the dev caller token from its banner, and then:
// StartLogin, follow the authorization URL through the CIS2 simulator (with login_hint),
// ExchangeCode, GetCurrentAal, GetPdsToken, GetApiToken("eps") refused with STEP_UP_REQUIRED
// (reason, metadata and the clinician's message decoded from google.rpc.Status in the
// `grpc-status-details-bin` trailer), a step-up with a smartcard, and GetApiToken("eps") again.
// Exits non-zero on the first mismatch.
//
//   node journey.js [--broker PATH]      # default: target/debug/session-broker
'use strict';

const { spawn } = require('node:child_process');
const fs = require('node:fs');
const http = require('node:http');
const net = require('node:net');
const os = require('node:os');
const path = require('node:path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const REPO = path.resolve(__dirname, '..', '..');
const USER = '656005750107'; // holds a passkey (AAL2) and a smartcard (AAL3)

class Mismatch extends Error {}

function expect(what, got, want) {
  if (JSON.stringify(got) !== JSON.stringify(want)) {
    throw new Mismatch(`${what}: got ${JSON.stringify(got)}, want ${JSON.stringify(want)}`);
  }
  console.log(`   ok  ${what} = ${JSON.stringify(got)}`);
}

const step = (text) => console.log(`\n-> ${text}`);

function loadService() {
  const def = protoLoader.loadSync('session_broker/v1/session_broker.proto', {
    includeDirs: [path.join(REPO, 'proto')],
    keepCase: true, // field names exactly as in the proto
    enums: String, // enum values by name: "AAL_2"
    longs: String,
    defaults: true,
  });
  return grpc.loadPackageDefinition(def).session_broker.v1.SessionBroker;
}

async function freePorts(n) {
  const servers = [];
  try {
    for (let i = 0; i < n; i++) {
      const s = net.createServer();
      await new Promise((resolve, reject) => s.listen(0, '127.0.0.1', resolve).on('error', reject));
      servers.push(s);
    }
    return servers.map((s) => s.address().port);
  } finally {
    await Promise.all(servers.map((s) => new Promise((resolve) => s.close(resolve))));
  }
}

// A `session-broker dev` child process; its log goes to a file shown on failure.
async function startBroker(binary) {
  const [grpcPort, httpPort, simPort, apimPort] = await freePorts(4);
  const logPath = path.join(fs.mkdtempSync(path.join(os.tmpdir(), 'broker-')), 'broker.log');
  const log = fs.openSync(logPath, 'w');
  const proc = spawn(binary, [
    'dev',
    '--grpc-addr', `127.0.0.1:${grpcPort}`,
    '--http-addr', `127.0.0.1:${httpPort}`,
    '--sim-addr', `127.0.0.1:${simPort}`,
    '--apim-addr', `127.0.0.1:${apimPort}`,
  ], { stdio: ['ignore', 'pipe', log] });
  const broker = {
    proc,
    logPath,
    grpcAddr: `127.0.0.1:${grpcPort}`,
    callback: `http://127.0.0.1:${httpPort}/dev/callback`,
    stop() {
      if (proc.exitCode === null && proc.signalCode === null) proc.kill('SIGTERM');
    },
  };
  broker.token = await new Promise((resolve, reject) => {
    let out = '';
    const timer = setTimeout(() => reject(new Mismatch('the broker did not print its caller token in 60 s')), 60000);
    proc.stdout.on('data', (chunk) => {
      out += chunk;
      const m = /export TOKEN=(\S+)/.exec(out);
      if (m) {
        clearTimeout(timer);
        resolve(m[1]);
      }
    });
    proc.on('exit', (code) => reject(new Mismatch(`the broker exited (${code}) before printing its token`)));
  });
  return broker;
}

function get(url) {
  return new Promise((resolve, reject) => {
    // node:http never follows redirects: each hop is seen.
    http.get(url, { timeout: 10000 }, (res) => {
      res.resume();
      res.on('end', () => resolve(res));
    }).on('error', reject);
  });
}

// Plays the browser: GETs until the Location is the callback, whose query it returns instead of
// loading it (ExchangeCode is this program's job).
async function followToCallback(authorizationUrl, callback, uid, authenticator) {
  const first = new URL(authorizationUrl);
  first.searchParams.append('login_hint', uid);
  first.searchParams.append('sim_authenticator', authenticator);
  let next = first;
  for (let i = 0; i < 8; i++) {
    if (next.href.startsWith(callback + '?')) return Object.fromEntries(next.searchParams);
    const res = await get(next);
    const location = res.headers.location;
    if (![301, 302, 303, 307, 308].includes(res.statusCode) || !location) {
      throw new Mismatch(`${next.origin}${next.pathname} answered ${res.statusCode}, not a redirect`);
    }
    const target = new URL(location, next);
    console.log(`   ${res.statusCode} ${next.host}${next.pathname} -> ${target.pathname}`);
    next = target;
  }
  throw new Mismatch('too many redirects before the callback');
}

// --- a small protobuf wire-format reader: enough for google.rpc.Status and its details ---

function readVarint(buf, pos) {
  let value = 0n;
  let shift = 0n;
  for (;;) {
    if (pos >= buf.length) throw new Mismatch('truncated varint');
    const b = buf[pos++];
    value |= BigInt(b & 0x7f) << shift;
    if ((b & 0x80) === 0) return [value, pos];
    shift += 7n;
    if (shift > 63n) throw new Mismatch('varint too long');
  }
}

// Every field of a message as [number, value]: varints as BigInt, length-delimited as Buffer.
function fields(buf) {
  const out = [];
  let pos = 0;
  while (pos < buf.length) {
    let key;
    [key, pos] = readVarint(buf, pos);
    const number = Number(key >> 3n);
    const wire = Number(key & 7n);
    if (wire === 0) {
      let v;
      [v, pos] = readVarint(buf, pos);
      out.push([number, v]);
    } else if (wire === 2) {
      let len;
      [len, pos] = readVarint(buf, pos);
      const end = pos + Number(len);
      if (end > buf.length) throw new Mismatch('truncated field');
      out.push([number, buf.subarray(pos, end)]);
      pos = end;
    } else if (wire === 1) {
      pos += 8;
    } else if (wire === 5) {
      pos += 4;
    } else {
      throw new Mismatch(`unsupported wire type ${wire}`);
    }
  }
  return out;
}

const str = (b) => Buffer.from(b).toString('utf8');

// google.rpc.Status { int32 code = 1; string message = 2; repeated Any details = 3; }
// Any { string type_url = 1; bytes value = 2; }
// ErrorInfo { string reason = 1; string domain = 2; map<string,string> metadata = 3; }
// LocalizedMessage { string locale = 1; string message = 2; }
function decodeStatusDetails(raw) {
  const status = { code: 0, message: '', errorInfo: null, localizedMessage: null, types: [] };
  for (const [n, v] of fields(raw)) {
    if (n === 1) status.code = Number(v);
    else if (n === 2) status.message = str(v);
    else if (n === 3) {
      let typeUrl = '';
      let value = Buffer.alloc(0);
      for (const [an, av] of fields(v)) {
        if (an === 1) typeUrl = str(av);
        else if (an === 2) value = av;
      }
      status.types.push(typeUrl);
      if (typeUrl.endsWith('/google.rpc.ErrorInfo')) {
        const info = { reason: '', domain: '', metadata: {} };
        for (const [en, ev] of fields(value)) {
          if (en === 1) info.reason = str(ev);
          else if (en === 2) info.domain = str(ev);
          else if (en === 3) {
            let k = '';
            let val = '';
            for (const [mn, mv] of fields(ev)) {
              if (mn === 1) k = str(mv);
              else if (mn === 2) val = str(mv);
            }
            info.metadata[k] = val;
          }
        }
        status.errorInfo = info;
      } else if (typeUrl.endsWith('/google.rpc.LocalizedMessage')) {
        const msg = { locale: '', message: '' };
        for (const [ln, lv] of fields(value)) {
          if (ln === 1) msg.locale = str(lv);
          else if (ln === 2) msg.message = str(lv);
        }
        status.localizedMessage = msg;
      }
    }
  }
  return status;
}

function statusDetails(err) {
  const raw = err.metadata && err.metadata.get('grpc-status-details-bin')[0];
  if (!raw) throw new Mismatch('the error carries no grpc-status-details-bin trailer');
  const status = decodeStatusDetails(raw);
  if (!status.errorInfo || !status.localizedMessage) {
    throw new Mismatch(`details lack ErrorInfo or LocalizedMessage: ${status.types.join(', ')}`);
  }
  return status;
}

// --- the journey ---

async function journey(SessionBroker, broker) {
  const client = new SessionBroker(broker.grpcAddr, grpc.credentials.createInsecure());
  await new Promise((resolve, reject) =>
    client.waitForReady(Date.now() + 30000, (e) => (e ? reject(e) : resolve())));
  const meta = () => {
    const m = new grpc.Metadata();
    m.set('authorization', `Bearer ${broker.token}`);
    return m;
  };
  const call = (rpc, req) => new Promise((resolve, reject) =>
    client[rpc](req, meta(), (err, res) => (err ? reject(err) : resolve(res))));

  try {
    step('StartLogin (AAL2)');
    let started = await call('StartLogin', { redirect_uri: broker.callback, required_aal: 'AAL_2' });
    expect('acr_values', started.acr_values, 'AAL2_OR_AAL3_ANY');
    expect('step_up', started.step_up, false);

    step(`sign in at the simulator as ${USER} with a passkey`);
    let cb = await followToCallback(started.authorization_url, broker.callback, USER, 'PASSKEY');
    expect('callback carries state, code and iss', ['code', 'iss', 'state'].filter((k) => cb[k]), ['code', 'iss', 'state']);

    step('ExchangeCode');
    let ex = await call('ExchangeCode', { state: cb.state, code: cb.code, iss: cb.iss });
    const sessionToken = ex.session_token;
    expect('session token issued', sessionToken.startsWith('cis2sb_'), true);
    expect('user', ex.session.user.uid, USER);
    expect('session AAL', ex.session.aal, 'AAL_2');
    const roleId = ex.session.selected_role.role_id;
    console.log(`   user ${ex.session.user.name}, role ${ex.session.selected_role.role_name}`);

    step('GetCurrentAal');
    let cur = await call('GetCurrentAal', { session_token: sessionToken });
    expect('aal', cur.aal, 'AAL_2');
    expect('authenticator', cur.authenticator, 'Passkey');

    step('GetPdsToken');
    const pds = await call('GetPdsToken', { session_token: sessionToken });
    expect('token_type', pds.token_type, 'Bearer');
    expect('api', pds.api, 'pds');
    expect('token aal', pds.aal, 'AAL_2');
    expect('NHSD-Session-URID header', pds.headers['NHSD-Session-URID'], roleId);

    step('GetApiToken eps (needs AAL3)');
    let refused = null;
    try {
      await call('GetApiToken', { session_token: sessionToken, api: 'eps' });
    } catch (err) {
      refused = err;
    }
    if (!refused) throw new Mismatch('GetApiToken eps succeeded at AAL2');
    expect('status code', refused.code, grpc.status.FAILED_PRECONDITION);
    const status = statusDetails(refused);
    expect('Status.code', status.code, grpc.status.FAILED_PRECONDITION);
    expect('ErrorInfo.domain', status.errorInfo.domain, 'session-broker');
    expect('ErrorInfo.reason', status.errorInfo.reason, 'STEP_UP_REQUIRED');
    expect('metadata api', status.errorInfo.metadata.api, 'eps');
    expect('metadata required_aal', status.errorInfo.metadata.required_aal, 'AAL_3');
    expect('metadata current_aal', status.errorInfo.metadata.current_aal, 'AAL_2');
    expect('clinician message names the smartcard', status.localizedMessage.message.includes('smartcard'), true);
    console.log(`   clinician sees (${status.localizedMessage.locale}): ${status.localizedMessage.message}`);

    step('StartLogin to step up the same session for eps');
    started = await call('StartLogin', { redirect_uri: broker.callback, api: 'eps', session_token: sessionToken });
    expect('acr_values', started.acr_values, 'AAL3_ANY');
    expect('step_up', started.step_up, true);
    cb = await followToCallback(started.authorization_url, broker.callback, USER, 'N3_SMARTCARD');
    ex = await call('ExchangeCode', { state: cb.state, code: cb.code, iss: cb.iss });
    expect('stepped_up', ex.stepped_up, true);
    expect('no new session token', ex.session_token, '');

    step('GetCurrentAal after step-up');
    cur = await call('GetCurrentAal', { session_token: sessionToken });
    expect('aal', cur.aal, 'AAL_3');
    expect('authenticator', cur.authenticator, 'Smartcard');

    step('GetApiToken eps');
    const eps = await call('GetApiToken', { session_token: sessionToken, api: 'eps' });
    expect('api', eps.api, 'eps');
    expect('token aal', eps.aal, 'AAL_3');
    expect('access token present', eps.access_token.length > 0, true);
  } finally {
    client.close();
  }
}

async function main() {
  const i = process.argv.indexOf('--broker');
  const binary = i > 0 ? process.argv[i + 1] : path.join(REPO, 'target', 'debug', 'session-broker');
  const SessionBroker = loadService();
  const broker = await startBroker(binary);
  try {
    await journey(SessionBroker, broker);
  } catch (e) {
    console.error(`\nFAILED: ${e.name}: ${e.message}`);
    broker.stop();
    const log = fs.readFileSync(broker.logPath, 'utf8');
    console.error(log.slice(-4000));
    return 1;
  } finally {
    broker.stop();
  }
  console.log('\nNode journey: all steps passed');
  return 0;
}

main().then((code) => { process.exitCode = code; }, (e) => {
  console.error(`FAILED: ${e.stack || e}`);
  process.exitCode = 1;
});
