// Keyboard use, phone width, and the UI's routes: focus order, modals that trap focus and close
// on Escape, a layout without horizontal scrolling at 390 px, the static assets and the local
// sign-in endpoints (and that none of them is in the OpenAPI document).

import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';

import { api, launchBrowser, screenshots, signIn, startServer, until, watchPage } from './harness.mjs';

let server;
let browser;
let token;
const problems = [];
const shot = screenshots('access');

before(async () => {
  server = await startServer('access');
  browser = await launchBrowser();
});

after(async () => {
  await browser?.close().catch(() => {});
  await server?.stop();
});

/** A short description of the focused element. */
const focused = (page) => page.evaluate(() => {
  const el = document.activeElement;
  return {
    tag: el.tagName.toLowerCase(),
    id: el.id,
    text: (el.getAttribute('aria-label') || el.textContent || '').trim().replace(/\s+/g, ' ').slice(0, 60),
    inDialog: Boolean(el.closest('dialog[open]')),
  };
});

async function connectViaApi(exchange, body) {
  const created = await api(server, token, 'POST', '/connections', { exchange, ...body });
  assert.equal(created.status, 202, JSON.stringify(created.body));
  await until(async () => {
    const { body: list } = await api(server, token, 'GET', '/connections');
    return list.find((c) => c.id === created.body.connection.id && c.status === 'connected');
  }, { timeout: 60_000, what: `${exchange} to be connected` });
  return created.body.connection;
}

test('the UI routes serve the page and its assets, outside the API document', async () => {
  const page = await fetch(`${server.base}/`);
  assert.equal(page.status, 200);
  assert.match(page.headers.get('content-type'), /^text\/html/);
  assert.match(page.headers.get('content-security-policy'), /frame-ancestors 'none'/);
  assert.equal(page.headers.get('x-content-type-options'), 'nosniff');
  assert.equal(page.headers.get('cross-origin-opener-policy'), 'same-origin');
  const callback = await fetch(`${server.base}/kite/callback?status=success`);
  assert.equal(callback.status, 200);
  assert.match(await callback.text(), /<script type="module" src="\/ui\/js\/main.js">/);

  const css = await fetch(`${server.base}/ui/app.css`);
  assert.equal(css.status, 200);
  assert.match(css.headers.get('content-type'), /^text\/css/);
  const etag = css.headers.get('etag');
  assert.ok(etag, 'an ETag');
  const again = await fetch(`${server.base}/ui/app.css`, { headers: { 'If-None-Match': etag } });
  assert.equal(again.status, 304);
  const js = await fetch(`${server.base}/ui/js/main.js`);
  assert.match(js.headers.get('content-type'), /^text\/javascript/);
  const missing = await fetch(`${server.base}/ui/js/nope.js`);
  assert.equal(missing.status, 404);
  assert.equal((await missing.json()).error.code, 'not_found');

  const doc = await (await fetch(`${server.base}/openapi.json`)).json();
  const paths = Object.keys(doc.paths);
  assert.ok(paths.includes('/connections'));
  for (const path of paths) {
    assert.ok(path !== '/' && !path.startsWith('/ui') && !path.startsWith('/kite'), `${path} is not a UI route`);
  }

  const config = await (await fetch(`${server.base}/ui/config`)).json();
  assert.deepEqual(config, { local_sign_in: true, portal_signin_url: null });
  const notJson = await fetch(`${server.base}/ui/local-signin`, { method: 'POST', body: 'code=x' });
  assert.equal(notJson.status, 415);
  const unknown = await fetch(`${server.base}/ui/local-signin`, {
    method: 'POST', headers: { 'Content-Type': 'application/json' }, body: JSON.stringify({ code: 'nope' }),
  });
  assert.equal(unknown.status, 400);
  assert.equal((await unknown.json()).error.field, 'code');
  const anonymousRenew = await fetch(`${server.base}/ui/local-signin/renew`, { method: 'POST' });
  assert.equal(anonymousRenew.status, 401);
});

test('keyboard: focus order, the wizard traps focus and closes on Escape', async () => {
  const context = await browser.newContext({ viewport: { width: 1280, height: 900 } });
  const page = await context.newPage();
  page.setDefaultTimeout(30_000);
  watchPage(page, problems);
  token = await signIn(page, server);

  // A renewed local token works like the first one.
  const renewed = await api(server, token, 'POST', '/ui/local-signin/renew');
  assert.equal(renewed.status, 200);
  assert.equal((await api(server, renewed.body.access_token, 'GET', '/connections')).status, 200);

  await connectViaApi('binance', { api_key: server.keys.binance.localOnly.key, api_secret: server.keys.binance.localOnly.secret });
  await page.locator('#connection-list .card[data-exchange="binance"][data-status="connected"]').waitFor({ timeout: 60_000 });

  // Tab from the top: skip link, header, then the page's main action before the cards.
  await page.evaluate(() => document.activeElement?.blur());
  const order = [];
  for (let i = 0; i < 12; i += 1) {
    await page.keyboard.press('Tab');
    order.push(await focused(page));
  }
  const labels = order.map((f) => f.text);
  assert.equal(labels[0], 'Skip to content');
  const connect = labels.findIndex((t) => t.includes('Connect exchange'));
  const firstCardButton = labels.findIndex((t) => t.endsWith('for Binance'));
  assert.ok(connect > 0 && firstCardButton > connect, `focus order: ${labels.join(' | ')}`);

  // Open the wizard from the keyboard.
  await page.locator('#connect-button').focus();
  await page.keyboard.press('Enter');
  const wizard = page.locator('dialog.wizard');
  await wizard.waitFor();
  assert.equal((await focused(page)).inDialog, true, 'focus moved into the dialog');
  for (let i = 0; i < 14; i += 1) {
    await page.keyboard.press('Tab');
    assert.equal((await focused(page)).inDialog, true, `Tab ${i + 1} stays in the dialog`);
  }
  for (let i = 0; i < 6; i += 1) {
    await page.keyboard.press('Shift+Tab');
    assert.equal((await focused(page)).inDialog, true, `Shift+Tab ${i + 1} stays in the dialog`);
  }

  // Choose with the arrow keys, continue with the Next button.
  await wizard.locator('input[name="exchange"]').first().focus();
  await page.keyboard.press('Space');
  await page.keyboard.press('ArrowDown');
  const chosen = await wizard.locator('input[name="exchange"]:checked').getAttribute('value');
  assert.ok(chosen, 'an exchange is chosen');
  await wizard.locator('[data-action="next"]').focus();
  await page.keyboard.press('Enter');
  await wizard.locator('[name="api_key"]').waitFor();
  assert.match((await focused(page)).text, /:/, 'the step heading has the focus');
  await page.keyboard.press('Tab');
  await page.keyboard.press('Tab');
  // The show/hide buttons answer the keyboard too.
  const reveal = wizard.locator('button.reveal').first();
  await reveal.focus();
  await page.keyboard.press('Space');
  assert.equal(await reveal.getAttribute('aria-pressed'), 'true');
  await shot(page, 'keyboard-wizard');

  await page.keyboard.press('Escape');
  await wizard.waitFor({ state: 'detached' });
  assert.equal((await focused(page)).id, 'connect-button', 'focus returns to the opener');

  // The revoke modal: the safe button first, focus trapped, Escape cancels.
  const revoke = page.getByRole('button', { name: 'Revoke for Binance' });
  await revoke.focus();
  await page.keyboard.press('Enter');
  const modal = page.locator('dialog[data-testid="revoke"]');
  await modal.waitFor();
  assert.equal((await focused(page)).text, 'Cancel');
  const seen = new Set();
  for (let i = 0; i < 6; i += 1) {
    await page.keyboard.press('Tab');
    const f = await focused(page);
    assert.equal(f.inDialog, true);
    seen.add(f.text);
  }
  assert.deepEqual([...seen].sort(), ['Cancel', 'Close', 'Revoke Binance']);
  await shot(page, 'keyboard-revoke');
  await page.keyboard.press('Escape');
  await modal.waitFor({ state: 'detached' });
  assert.equal((await focused(page)).text, 'Revoke for Binance', 'focus returns to the card button');
  assert.equal((await api(server, token, 'GET', '/connections')).body.length, 1, 'Escape revoked nothing');

  // The rotate modal starts at its first field.
  await page.getByRole('button', { name: 'Rotate keys for Binance' }).focus();
  await page.keyboard.press('Enter');
  await page.locator('dialog.modal [name="api_key"]').waitFor();
  assert.equal((await focused(page)).tag, 'input');
  await page.keyboard.press('Escape');
  await page.locator('dialog.modal').waitFor({ state: 'detached' });

  // Signing out forgets the token.
  await page.locator('#sign-out').click();
  await page.locator('#signin').waitFor();
  assert.equal(await page.locator('#signin-message').innerText(), 'You signed out.');
  assert.equal(await page.evaluate(() => sessionStorage.getItem('tradeeon.session')), null);
  await context.close();
});

test('a token the API refuses sends the page back to sign-in', async () => {
  const context = await browser.newContext();
  const page = await context.newPage();
  await page.goto(`${server.base}/`);
  await page.evaluate(() => sessionStorage.setItem('tradeeon.session',
    JSON.stringify({ token: 'not.a.token', expiresAt: Date.now() + 3_600_000, local: false })));
  await page.reload();
  await page.locator('#signin').waitFor();
  await until(async () => (await page.locator('#signin-message').innerText()).includes('malformed'), { what: 'the refusal message' });
  assert.equal(await page.evaluate(() => sessionStorage.getItem('tradeeon.session')), null);
  await context.close();
});

test('phone width: no horizontal scrolling, full-screen dialogs, a stacked audit log', async () => {
  const context = await browser.newContext({ viewport: { width: 390, height: 844 }, isMobile: true, hasTouch: true });
  const page = await context.newPage();
  page.setDefaultTimeout(30_000);
  watchPage(page, problems);
  await signIn(page, server);
  await page.locator('#connection-list .card[data-exchange="binance"][data-status="connected"]').waitFor({ timeout: 60_000 });
  await page.locator('#audit-rows tr').first().waitFor();
  const fits = () => page.evaluate(() => document.documentElement.scrollWidth <= window.innerWidth);
  assert.equal(await fits(), true, 'no horizontal scrolling');
  await shot(page, 'phone-connections');

  // The audit table becomes one block per entry, labelled.
  const display = await page.locator('#audit-rows td').first().evaluate((td) => getComputedStyle(td).display);
  assert.equal(display, 'block');
  await page.locator('#audit').scrollIntoViewIfNeeded();
  await shot(page, 'phone-audit', { fullPage: false });

  await page.locator('#connect-button').tap();
  const wizard = page.locator('dialog.wizard');
  await wizard.waitFor();
  const box = await wizard.boundingBox();
  assert.ok(box.width >= 389 && box.x <= 1, `the wizard fills the width (${JSON.stringify(box)})`);
  await shot(page, 'phone-wizard-1');
  await wizard.locator('label.exchange-option[data-exchange="coinbase"]').tap();
  await wizard.locator('[data-action="next"]').tap();
  await wizard.locator('textarea[name="api_secret"]').waitFor();
  assert.equal(await fits(), true);
  await shot(page, 'phone-wizard-2');
  await wizard.getByRole('button', { name: 'Close' }).tap();
  await wizard.waitFor({ state: 'detached' });

  await page.getByRole('button', { name: 'Rotate keys for Binance' }).tap();
  const modal = page.locator('dialog.modal');
  await modal.waitFor();
  await shot(page, 'phone-rotate');
  await modal.getByRole('button', { name: 'Close' }).tap();
  await context.close();
  assert.deepEqual(problems, []);
});
