#!/usr/bin/env node
// The dev walk-through in a real browser: headless Chromium (Debian's /usr/bin/chromium, or
// $CHROMIUM) driven by playwright-core, against a real `session-broker dev` process.
//
// /dev -> "Sign in" -> the simulator's page -> click a test user's passkey -> /dev/callback shows
// the user at AAL2 -> a PDS token -> EPS asks for a stronger sign-in -> "Sign in again" -> the
// smartcard -> AAL3 -> an EPS token. A screenshot of each page goes to
// target/browser-screenshots/. Exits non-zero on the first mismatch.
//
//   node walkthrough.js [--broker PATH]      # default: target/debug/session-broker
'use strict';

const { spawn } = require('node:child_process');
const fs = require('node:fs');
const net = require('node:net');
const os = require('node:os');
const path = require('node:path');
const { chromium } = require('playwright-core');

const REPO = path.resolve(__dirname, '..', '..');
const SHOTS = path.join(REPO, 'target', 'browser-screenshots');
const USER = '656005750107'; // holds a passkey (AAL2) and a smartcard (AAL3)
const STEP_TIMEOUT_MS = 15000;

// Without the background-networking flags Chromium keeps calling out to Google, which this
// machine's closed network refuses.
const CHROMIUM_FLAGS = [
  '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
  '--disable-background-networking', '--disable-component-update', '--disable-sync',
];

class Mismatch extends Error {}

function expect(what, got, want) {
  const ok = want instanceof RegExp ? want.test(got) : got === want;
  if (!ok) throw new Mismatch(`${what}: got ${JSON.stringify(got)}, want ${want}`);
  console.log(`   ok  ${what}: ${JSON.stringify(got)}`);
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

async function startBroker(binary, tmp) {
  const [grpcPort, httpPort, simPort, apimPort] = await freePorts(4);
  const logPath = path.join(tmp, 'broker.log');
  const log = fs.openSync(logPath, 'w');
  const proc = spawn(binary, [
    'dev',
    '--grpc-addr', `127.0.0.1:${grpcPort}`,
    '--http-addr', `127.0.0.1:${httpPort}`,
    '--sim-addr', `127.0.0.1:${simPort}`,
    '--apim-addr', `127.0.0.1:${apimPort}`,
  ], { stdio: ['ignore', 'pipe', log] });
  // The banner is printed once every listener is bound: then the pages answer.
  await new Promise((resolve, reject) => {
    let out = '';
    const timer = setTimeout(() => reject(new Mismatch('the broker printed no banner in 60 s')), 60000);
    proc.stdout.on('data', (chunk) => {
      out += chunk;
      if (out.includes('export TOKEN=')) {
        clearTimeout(timer);
        resolve();
      }
    });
    proc.on('exit', (code) => reject(new Mismatch(`the broker exited (${code}) at start-up`)));
  });
  return {
    logPath,
    base: `http://127.0.0.1:${httpPort}`,
    sim: `http://127.0.0.1:${simPort}`,
    stop() {
      if (proc.exitCode === null && proc.signalCode === null) proc.kill('SIGTERM');
    },
  };
}

async function walkthrough(page, broker) {
  let n = 0;
  const shot = async (name) => {
    n += 1;
    const file = path.join(SHOTS, `${String(n).padStart(2, '0')}-${name}.png`);
    await page.screenshot({ path: file, fullPage: true });
    console.log(`   screenshot ${path.relative(REPO, file)}`);
  };
  const text = async (selector) => (await page.locator(selector).innerText()).trim();
  const onPage = async (what, urlPrefix) => {
    await page.waitForURL((u) => u.href.startsWith(urlPrefix), { timeout: STEP_TIMEOUT_MS });
    await page.waitForLoadState('load');
    console.log(`\n-> ${what}: ${new URL(page.url()).pathname}`);
  };

  await page.goto(`${broker.base}/dev`);
  await onPage('the dev walk-through', `${broker.base}/dev`);
  await shot('dev-home');

  await page.click('#login-aal2');
  await onPage("the simulator's sign-in page", broker.sim);
  expect('asks for', await text('.lead strong'), 'AAL2_OR_AAL3_ANY');
  await shot('simulator-aal2');

  await page.click(`#signin-${USER}-PASSKEY`);
  await onPage('the callback', `${broker.base}/dev/callback`);
  expect('headline', await text('#headline'), 'You are signed in.');
  expect('user', await text('#user'), new RegExp(`\\(${USER}\\)$`));
  expect('level', await text('#aal'), 'AAL2');
  expect('signed in with', await text('#authenticator'), 'Passkey');
  await shot('signed-in-aal2');

  await page.click('#get-pds');
  await onPage('a PDS token', `${broker.base}/dev/token`);
  expect('PDS token minted at', await text('#token-aal'), 'AAL2');
  await shot('pds-token');

  await page.click('#try-eps');
  await onPage('EPS at AAL2', `${broker.base}/dev/token`);
  expect('clinician message', await text('#step-up-needed p'), /smartcard/);
  await shot('step-up-needed');

  await page.click('#step-up');
  await onPage("the simulator's sign-in page for the step-up", broker.sim);
  expect('asks for', await text('.lead strong'), 'AAL3_ANY');
  expect('passkey refused', await page.locator(`#signin-${USER}-PASSKEY`).isDisabled(), true);
  await shot('simulator-aal3');

  await page.click(`#signin-${USER}-N3_SMARTCARD`);
  await onPage('the callback after step-up', `${broker.base}/dev/callback`);
  expect('headline', await text('#headline'), /upgraded/);
  expect('user', await text('#user'), new RegExp(`\\(${USER}\\)$`));
  expect('level', await text('#aal'), 'AAL3');
  expect('signed in with', await text('#authenticator'), 'Smartcard');
  await shot('stepped-up-aal3');

  await page.click('#try-eps');
  await onPage('an EPS token', `${broker.base}/dev/token`);
  expect('EPS token minted at', await text('#token-aal'), 'AAL3');
  expect('for', await text('#token b'), 'eps');
  await shot('eps-token');
}

async function main() {
  const i = process.argv.indexOf('--broker');
  const binary = i > 0 ? process.argv[i + 1] : path.join(REPO, 'target', 'debug', 'session-broker');
  const executablePath = process.env.CHROMIUM || '/usr/bin/chromium';
  fs.rmSync(SHOTS, { recursive: true, force: true });
  fs.mkdirSync(SHOTS, { recursive: true });
  const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'sb-browser-'));
  const broker = await startBroker(binary, tmp);
  let context;
  try {
    // A fresh profile each run: no cookies or state from an earlier run.
    context = await chromium.launchPersistentContext(path.join(tmp, 'profile'), {
      executablePath,
      headless: true,
      args: CHROMIUM_FLAGS,
      viewport: { width: 1100, height: 900 },
      timeout: 60000,
    });
    const page = context.pages()[0] || (await context.newPage());
    page.setDefaultTimeout(STEP_TIMEOUT_MS);
    await walkthrough(page, broker);
  } catch (e) {
    console.error(`\nFAILED: ${e.name}: ${e.message}`);
    console.error(fs.readFileSync(broker.logPath, 'utf8').slice(-4000));
    return 1;
  } finally {
    if (context) await context.close();
    broker.stop();
    fs.rmSync(tmp, { recursive: true, force: true });
  }
  console.log(`\nBrowser walk-through: all steps passed; screenshots in ${path.relative(REPO, SHOTS)}/`);
  return 0;
}

main().then((code) => { process.exitCode = code; }, (e) => {
  console.error(`FAILED: ${e.stack || e}`);
  process.exitCode = 1;
});
