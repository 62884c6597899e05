// The whole journey through the web UI, in a real browser against `tradeeon serve --simulate`:
// sign in, connect all four exchanges through the wizard (Zerodha through the Kite redirect),
// watch each reach `connected` without reloading, rotate with bad keys (refused, old keys kept)
// and good keys, test keys, revoke, and read it all back in the audit log.

import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';

import { EGRESS_IPS, api, launchBrowser, screenshots, startServer, until, watchPage } from './harness.mjs';

const WAIT = { timeout: 60_000 };
let server;
let browser;
let context;
let page;
let token;
const problems = [];
const shot = screenshots('journey');

before(async () => {
  server = await startServer('journey');
  browser = await launchBrowser();
  context = await browser.newContext({ viewport: { width: 1280, height: 900 } });
  await context.grantPermissions(['clipboard-read', 'clipboard-write'], { origin: server.base });
  page = await context.newPage();
  page.setDefaultTimeout(30_000);
  watchPage(page, problems);
});

after(async () => {
  await browser?.close().catch(() => {});
  await server?.stop();
});

const wizard = () => page.locator('dialog.wizard');
const card = (exchange) => page.locator(`#connection-list .card[data-exchange="${exchange}"]`);

async function connections() {
  const { status, body } = await api(server, token, 'GET', '/connections');
  assert.equal(status, 200);
  return body;
}

/** Steps 1–3 of the wizard for an API-key exchange; leaves it on the test result. */
async function chooseAndTest(exchange, fill) {
  await page.locator('#connect-button').click();
  await wizard().waitFor();
  await wizard().locator(`label.exchange-option[data-exchange="${exchange}"]`).click();
  await wizard().locator('[data-action="next"]').click();
  await wizard().locator('[name="api_key"]').waitFor();
  await fill(wizard());
  await wizard().locator('[data-action="test"]').click();
}

async function finishConnect(exchange, name) {
  const ok = wizard().locator('.result[data-ok="true"]');
  await ok.waitFor(WAIT);
  await wizard().locator('[data-action="review"]').click();
  await wizard().locator('[data-action="save"]').waitFor();
  await shot(page, `${exchange}-review`);
  const navigations = [];
  const onNavigate = (frame) => { if (frame === page.mainFrame()) navigations.push(frame.url()); };
  page.on('framenavigated', onNavigate);
  await wizard().locator('[data-action="save"]').click();
  await wizard().waitFor({ state: 'detached' });
  await card(exchange).waitFor();
  // Live status: the card turns connected by polling, with no reload.
  await page.locator(`#connection-list .card[data-exchange="${exchange}"][data-status="connected"]`).waitFor(WAIT);
  page.off('framenavigated', onNavigate);
  assert.deepEqual(navigations, [], 'the page did not reload while the status changed');
  assert.match(await card(exchange).locator('.badge').innerText(), /Connected/);
  assert.match(await card(exchange).locator('h3').innerText(), new RegExp(name));
  assert.match(await card(exchange).locator('.latency').innerText(), /\d+ ms/);
  assert.notEqual(await card(exchange).locator('.last-check').innerText(), 'not yet');
}

test('the page asks to sign in, and a bad or used link is refused', async () => {
  const response = await page.goto(`${server.base}/`);
  assert.equal(response.status(), 200);
  assert.match(response.headers()['content-security-policy'], /default-src 'self'/);
  await page.locator('#signin').waitFor();
  await page.locator('#signin-local').waitFor();
  await shot(page, 'signin');

  await page.goto(`${server.base}/#signin=not-a-real-code`);
  await until(async () => (await page.locator('#signin-message').innerText()).includes('not valid'), { what: 'the bad-link message' });
  assert.equal(page.url(), `${server.base}/`, 'the code is removed from the address bar');
  await shot(page, 'signin-bad-link');
});

test('a one-time link signs in and shows the empty state', async () => {
  const link = await server.nextSignInLink();
  await page.goto(link);
  await page.locator('#app').waitFor();
  await page.locator('#empty-state').waitFor();
  assert.equal(page.url(), `${server.base}/`, 'the code is removed from the address bar');
  token = await page.evaluate(() => JSON.parse(sessionStorage.getItem('tradeeon.session')).token);
  assert.ok(token.split('.').length === 3, 'a JWT');
  assert.equal(await page.locator('#account-email').innerText(), 'local@tradeeon.invalid');
  // The egress IPs are listed for whitelisting.
  for (const ip of EGRESS_IPS) await page.locator('#egress-list code', { hasText: ip }).waitFor();
  await shot(page, 'empty-state');

  // The same link does not work twice (a fresh page has no session yet).
  const other = await context.newPage();
  await other.goto(link);
  await until(async () => (await other.locator('#signin-message').innerText()).includes('already been used'), { what: 'the used-link message' });
  await other.close();
});

test('Binance connects through the four steps', async () => {
  const { full } = server.keys.binance;
  await page.locator('#connect-button').click();
  await wizard().waitFor();
  assert.equal(await wizard().getAttribute('data-step'), '1');
  await shot(page, 'wizard-1-exchange');
  // Next without a choice says so.
  await wizard().locator('[data-action="next"]').click();
  await wizard().locator('#exchange-choice-error', { hasText: 'Choose an exchange' }).waitFor();
  await wizard().locator('label.exchange-option[data-exchange="binance"]').click();
  await wizard().locator('[data-action="next"]').click();
  assert.equal(await wizard().getAttribute('data-step'), '2');

  // Required fields are checked before anything is sent.
  await wizard().locator('[data-action="test"]').click();
  await wizard().locator('[data-field="api_key"] .field-error').waitFor();

  await wizard().locator('[name="api_key"]').fill(full.key);
  const secret = wizard().locator('[name="api_secret"]');
  await secret.fill(full.secret);
  assert.equal(await secret.getAttribute('type'), 'password');
  await wizard().getByRole('button', { name: 'Show Secret key' }).click();
  assert.equal(await secret.getAttribute('type'), 'text');
  await wizard().getByRole('button', { name: 'Hide Secret key' }).click();
  assert.equal(await secret.getAttribute('type'), 'password');
  await wizard().locator('[name="nickname"]').fill('Main account');
  await shot(page, 'wizard-2-credentials');

  // Hold the job polls for a moment, to see (and photograph) the progress state.
  let release;
  const held = new Promise((resolve) => { release = resolve; });
  await page.route('**/jobs/*', async (route) => { await held; await route.continue(); });
  await wizard().locator('[data-action="test"]').click();
  const progress = wizard().locator('.progress-box');
  await progress.waitFor();
  assert.equal(await wizard().getAttribute('data-step'), '3');
  assert.equal(await progress.getAttribute('data-state'), 'queued');
  assert.match(await progress.innerText(), /Queued/);
  assert.equal(await progress.locator('progress').evaluate((el) => el.hasAttribute('value')), false, 'indeterminate');
  assert.equal(await wizard().locator('[data-action="review"]').isDisabled(), true, 'no review before the verdict');
  await shot(page, 'wizard-3-test-queued');
  release();
  // Lets the held polls through before the handler goes.
  await page.unrouteAll({ behavior: 'wait' });
  await wizard().locator('.result[data-ok="true"]').waitFor(WAIT);
  // The key has no IP restriction: the result warns about it.
  await wizard().locator('.result [data-warning="no_ip_restriction"]').waitFor();
  assert.equal(await wizard().locator('.progress-box').getAttribute('data-state'), 'done');
  await shot(page, 'wizard-3-test-passed');

  await finishConnect('binance', 'Binance');
  assert.equal(await card('binance').locator('.nickname').innerText(), 'Main account');
  await card('binance').locator('.chip', { hasText: 'Not IP-restricted' }).waitFor();
  await shot(page, 'binance-connected');

  const [binance] = (await connections()).filter((c) => c.exchange === 'binance');
  assert.equal(binance.status, 'connected');
  assert.equal(binance.api_key_hint, `…${full.key.slice(-4)}`);
});

test('Kraken: an API error is shown next to its field; the optional two-factor password works', async () => {
  const otp = server.keys.kraken.otp;
  await chooseAndTest('kraken', async (w) => {
    await w.locator('[name="api_key"]').fill(otp.key);
    await w.locator('[name="api_secret"]').fill('this is not base64!');
  });
  // 422 with error.field = api_secret: the message sits under that field, the wizard stays.
  const error = wizard().locator('[data-field="api_secret"] .field-error');
  await error.waitFor();
  assert.match(await error.innerText(), /base64/);
  assert.equal(await wizard().locator('[name="api_secret"]').getAttribute('aria-invalid'), 'true');
  assert.equal(await wizard().getAttribute('data-step'), '2');
  await shot(page, 'kraken-field-error');

  await wizard().locator('[name="api_secret"]').fill(otp.secret);
  await wizard().locator('[name="passphrase"]').fill(otp.passphrase);
  await wizard().locator('[data-action="test"]').click();
  await finishConnect('kraken', 'Kraken');
  await card('kraken').locator('.chip.chip-ok', { hasText: 'IP-restricted' }).waitFor();
});

test('Coinbase connects with a multi-line CDP private key', async () => {
  const { keyName, privateKey } = server.keys.coinbase;
  await chooseAndTest('coinbase', async (w) => {
    await w.locator('[name="api_key"]').fill(keyName);
    const pem = w.locator('textarea[name="api_secret"]');
    assert.equal(await pem.evaluate((el) => el.classList.contains('masked')), true, 'masked until shown');
    await pem.fill(privateKey);
    assert.equal(await pem.inputValue(), privateKey, 'the newlines are kept');
    await w.locator('[name="nickname"]').fill('CDP key');
    await shot(page, 'coinbase-credentials');
  });
  await finishConnect('coinbase', 'Coinbase');
});

test('Zerodha connects through the Kite login redirect', async () => {
  const { apiKey, apiSecret } = server.keys.zerodha;
  await page.locator('#connect-button').click();
  await wizard().locator('label.exchange-option[data-exchange="zerodha"]').click();
  await wizard().locator('[data-action="next"]').click();
  await wizard().locator('[name="api_key"]').fill(apiKey);
  await wizard().locator('[name="api_secret"]').fill(apiSecret);
  await wizard().locator('code', { hasText: '/kite/callback' }).waitFor();
  await shot(page, 'zerodha-credentials');

  // Kite (the simulator) logs the user in and redirects to /kite/callback.
  const visited = [];
  const onNavigate = (frame) => { if (frame === page.mainFrame()) visited.push(frame.url()); };
  page.on('framenavigated', onNavigate);
  await wizard().locator('[data-action="kite-login"]').click();
  await page.locator('dialog.wizard .result[data-ok="true"]').waitFor(WAIT);
  page.off('framenavigated', onNavigate);
  assert.ok(visited.some((url) => new URL(url).pathname === '/kite/callback' && url.includes('request_token=')),
    `came back through /kite/callback: ${visited.join(' ')}`);
  assert.equal(new URL(page.url()).pathname, '/', 'the request token is dropped from the address bar');
  assert.equal(await wizard().getAttribute('data-step'), '3');
  await shot(page, 'zerodha-session-checked');

  await wizard().locator('[data-action="review"]').click();
  await wizard().locator('[data-action="done"]').waitFor();
  await shot(page, 'zerodha-review');
  await wizard().locator('[data-action="done"]').click();
  await page.locator('#connection-list .card[data-exchange="zerodha"][data-status="connected"]').waitFor(WAIT);
  // A Kite session is renewed by logging in again, not rotated.
  await card('zerodha').getByRole('button', { name: 'Log in to Kite again for Zerodha' }).waitFor();
  assert.equal(await card('zerodha').getByRole('button', { name: /Rotate keys/ }).count(), 0);
  await shot(page, 'four-connected');
  assert.deepEqual((await connections()).map((c) => c.status).sort(), ['connected', 'connected', 'connected', 'connected']);
});

test('rotating to bad keys is refused and the old keys stay', async () => {
  const before = (await connections()).find((c) => c.exchange === 'binance');
  const { revoked } = server.keys.binance;
  await card('binance').getByRole('button', { name: 'Rotate keys for Binance' }).click();
  const modal = page.locator('dialog.modal', { hasText: 'Rotate keys for Binance' });
  await modal.waitFor();
  await modal.locator('[name="api_key"]').fill(revoked.key);
  await modal.locator('[name="api_secret"]').fill(revoked.secret);
  await shot(page, 'rotate-form');
  await modal.locator('[data-action="submit"]').click();
  const refused = modal.locator('.result[data-ok="false"]');
  await refused.waitFor(WAIT);
  assert.match(await refused.innerText(), /previous keys are still in use/);
  await modal.locator('[data-outcome="kept"]').waitFor();
  // The submitted secrets are gone from the page.
  assert.equal(await modal.locator('[name="api_secret"]').inputValue(), '');
  await shot(page, 'rotate-refused');

  // The API agrees: same key, same status, and a rotate_failed audit row.
  const after = (await connections()).find((c) => c.exchange === 'binance');
  assert.equal(after.api_key_hint, before.api_key_hint);
  assert.equal(after.status, 'connected');
  const audit = await api(server, token, 'GET', '/connections/audit?limit=50');
  assert.ok(audit.body.some((e) => e.action === 'rotate_failed' && e.connection_id === before.id), 'rotate_failed audited');

  await modal.locator('[data-action="retry"]').click();
  await modal.locator('[name="api_key"]').waitFor();
  await page.keyboard.press('Escape');
  await modal.waitFor({ state: 'detached' });
});

test('rotating to good keys swaps them in', async () => {
  const before = (await connections()).find((c) => c.exchange === 'binance');
  const { localOnly } = server.keys.binance;
  await card('binance').getByRole('button', { name: 'Rotate keys for Binance' }).click();
  const modal = page.locator('dialog.modal', { hasText: 'Rotate keys for Binance' });
  await modal.locator('[name="api_key"]').fill(localOnly.key);
  await modal.locator('[name="api_secret"]').fill(localOnly.secret);
  await modal.locator('[data-action="submit"]').click();
  await modal.locator('.result[data-ok="true"]', { hasText: 'Keys rotated' }).waitFor(WAIT);
  await modal.locator('[data-outcome="rotated"]').waitFor();
  await shot(page, 'rotate-done');
  await modal.locator('[data-action="done"]').click();
  await modal.waitFor({ state: 'detached' });

  const newHint = `…${localOnly.key.slice(-4)}`;
  await until(async () => (await card('binance').locator('.key-hint').innerText()) === newHint, { what: 'the new key hint on the card' });
  await card('binance').locator('.chip.chip-ok', { hasText: 'IP-restricted' }).waitFor();
  const after = (await connections()).find((c) => c.exchange === 'binance');
  assert.equal(after.id, before.id);
  assert.equal(after.api_key_hint, newHint);
  assert.equal(after.status, 'connected');
});

test('Test checks keys without saving them', async () => {
  const { full } = server.keys.kraken;
  const before = (await connections()).find((c) => c.exchange === 'kraken');
  await card('kraken').getByRole('button', { name: 'Test keys for Kraken' }).click();
  const modal = page.locator('dialog.modal', { hasText: 'Test keys for Kraken' });
  await modal.locator('[name="api_key"]').fill(full.key);
  await modal.locator('[name="api_secret"]').fill(full.secret);
  await modal.locator('[data-action="submit"]').click();
  await modal.locator('.result[data-ok="true"]').waitFor(WAIT);
  await shot(page, 'test-keys');
  await modal.locator('[data-action="done"]').click();
  const after = (await connections()).find((c) => c.exchange === 'kraken');
  assert.equal(after.api_key_hint, before.api_key_hint, 'nothing was saved');
});

test('History draws the checks as a chart and lists them', async () => {
  const binance = (await connections()).find((c) => c.exchange === 'binance');
  const { status, body: checks } = await api(server, token, 'GET', `/connections/${binance.id}/history`);
  assert.equal(status, 200);
  assert.ok(checks.length >= 1, 'the keys were checked when they were saved');
  const opener = card('binance').getByRole('button', { name: 'Health history for Binance' });
  await opener.click();
  const modal = page.locator('dialog.modal', { hasText: 'Health history' });
  await modal.locator('svg.history-chart').waitFor();
  await shot(page, 'history');
  // One band segment and one table row per check, newest first in the table. A health sweep
  // may add a check meanwhile, so the page shows what the API had before or after it opened.
  const shown = await modal.locator('.history-table tbody tr').count();
  const { body: latest } = await api(server, token, 'GET', `/connections/${binance.id}/history`);
  assert.ok(shown >= checks.length && shown <= latest.length, `${shown} rows, ${checks.length}–${latest.length} checks`);
  assert.equal(await modal.locator('svg.history-chart rect.band').count(), shown);
  const newest = modal.locator('.history-table tbody tr').first();
  assert.ok(latest.some((c) => c.checked_at === checks[0].checked_at));
  assert.match(await newest.locator('.badge').innerText(), /Connected/);
  assert.match(await modal.locator('svg.history-chart').getAttribute('aria-label'), new RegExp(`^${shown} checks? from `));
  assert.ok(await modal.locator('[data-action="more"]').isHidden(), 'one page holds them all');
  await page.keyboard.press('Escape');
  await modal.waitFor({ state: 'detached' });
  assert.equal(await opener.evaluate((el) => el === document.activeElement), true, 'focus returns to the button');
});

test('revoking names the exchange and removes the card', async () => {
  const coinbase = (await connections()).find((c) => c.exchange === 'coinbase');
  await card('coinbase').getByRole('button', { name: 'Revoke for Coinbase' }).click();
  const modal = page.locator('dialog[data-testid="revoke"]');
  await modal.waitFor();
  assert.match(await modal.locator('h2').innerText(), /Revoke Coinbase\?/);
  assert.match(await modal.innerText(), /CDP key/);
  const confirm = modal.getByRole('button', { name: 'Revoke Coinbase' });
  await confirm.waitFor();
  assert.equal(await modal.getByRole('button', { name: 'Cancel' }).evaluate((el) => el === document.activeElement), true,
    'the safe choice has the focus');
  await shot(page, 'revoke-confirm');
  await confirm.click();
  await card('coinbase').waitFor({ state: 'detached' });
  await shot(page, 'after-revoke');
  const remaining = await connections();
  assert.ok(!remaining.some((c) => c.id === coinbase.id), 'the API no longer lists it');
  assert.equal(remaining.length, 3);
});

test('the audit log shows what happened, page by page', async () => {
  await page.locator('#audit-refresh').click();
  const rows = page.locator('#audit-rows tr');
  for (const action of ['connected', 'tested', 'rotated', 'rotate_failed', 'revoked', 'session_created']) {
    await page.locator(`#audit-rows tr[data-action="${action}"]`).first().waitFor();
  }
  assert.match(await page.locator('#audit-rows tr[data-action="revoked"]').first().innerText(), /Coinbase/);
  assert.match(await page.locator('#audit-rows tr[data-action="rotate_failed"]').first().innerText(), /Binance/);
  await page.locator('#audit').scrollIntoViewIfNeeded();
  await shot(page, 'audit-log');

  // More than a page of entries: "Load older entries" follows the Link header (`before=`).
  const total = (await api(server, token, 'GET', '/connections/audit?limit=1000')).body.length;
  for (let i = total; i <= 25; i += 1) {
    const { status } = await api(server, token, 'POST', '/connections/test', {
      exchange: 'binance', api_key: server.keys.binance.full.key, api_secret: server.keys.binance.full.secret,
    });
    assert.equal(status, 202);
  }
  // Each test's `tested` entry is written when the worker settles it, with the verdict.
  const expected = Math.max(total, 26);
  const all = await until(async () => {
    const count = (await api(server, token, 'GET', '/connections/audit?limit=1000')).body.length;
    return count >= expected && count;
  }, { what: `${expected} audit entries` });
  assert.ok(all > 20, `${all} entries`);
  await page.locator('#audit-refresh').click();
  await until(async () => (await rows.count()) === 20, { what: 'the first page of 20 rows' });
  const more = page.locator('#audit-more');
  await more.waitFor();
  const requested = page.waitForRequest((r) => r.url().includes('/connections/audit') && r.url().includes('before='));
  await more.click();
  await requested;
  await until(async () => (await rows.count()) === all, { what: 'the older entries' });
  await page.locator('#audit-end').waitFor();
  assert.equal(await more.isHidden(), true);
  const ids = await rows.evaluateAll((trs) => trs.map((tr) => tr.dataset.id));
  assert.equal(new Set(ids).size, ids.length, 'no entry twice');
});

test('egress IPs can be copied', async () => {
  await page.locator('#security').scrollIntoViewIfNeeded();
  await page.getByRole('button', { name: `Copy ${EGRESS_IPS[0]}` }).click();
  await until(async () => (await page.locator('#copy-status').innerText()).includes('copied'), { what: 'the copy confirmation' });
  assert.equal(await page.evaluate(() => navigator.clipboard.readText()), EGRESS_IPS[0]);
  await shot(page, 'security-panel', { fullPage: false });
});

test('no credential is kept in browser storage, and the page logged no errors', async () => {
  const stored = await page.evaluate(() => ({
    local: JSON.stringify({ ...localStorage }),
    session: JSON.stringify({ ...sessionStorage }),
  }));
  assert.equal(stored.local, '{}', 'nothing in localStorage');
  const secrets = [server.keys.binance.full.secret, server.keys.binance.localOnly.secret, server.keys.kraken.otp.secret,
    server.keys.zerodha.apiSecret, server.keys.coinbase.privateKey.split('\n')[1]];
  for (const secret of secrets) {
    assert.ok(!stored.session.includes(secret), 'no secret in sessionStorage');
    assert.ok(!(await page.content()).includes(secret), 'no secret left in the page');
  }
  assert.deepEqual(problems, []);
});
