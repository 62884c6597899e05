// Signing in behind the portal, and the attacks on it: a crafted `#access_token=` link, a
// fragment changed after load, a page that opened the UI and later navigates it, and a sign-in
// that would silently replace the signed-in account. The server verifies Supabase-style HS256
// tokens; a small "portal" on another loopback port signs users in and sends them back with the
// UI's `state`, and an "attacker" site on a third port opens the UI.

import assert from 'node:assert/strict';
import crypto from 'node:crypto';
import { after, before, test } from 'node:test';

import { accessToken, launchBrowser, screenshots, startServer, startSite, until, watchPage } from './harness.mjs';

const SECRET = crypto.randomBytes(32).toString('hex');
const VICTIM = { id: crypto.randomUUID(), email: 'victim@example.com' };
const ATTACKER = { id: crypto.randomUUID(), email: 'attacker@example.com' };
const OTHER = { id: crypto.randomUUID(), email: 'second-account@example.com' };
const attackerToken = accessToken(SECRET, ATTACKER);

let server;
let portal;
let attackerSite;
let browser;
/** Who is signed in at the portal, and where it last sent a user back to. */
const portalSession = { user: VICTIM, lastRedirect: null };
const problems = [];
const shot = screenshots('signin');

before(async () => {
  portal = await startSite((request, response, url) => {
    const redirectTo = url.searchParams.get('redirect_to') ?? '';
    const state = url.searchParams.get('state') ?? '';
    // A real portal sends users back only to the UI it knows.
    if (url.pathname !== '/signin' || redirectTo !== `${server.base}/` || !state) {
      response.writeHead(400).end('bad sign-in request');
      return;
    }
    const fragment = new URLSearchParams({
      access_token: accessToken(SECRET, portalSession.user), expires_in: '3600', token_type: 'bearer', state,
    });
    portalSession.lastRedirect = `${redirectTo}#${fragment}`;
    response.writeHead(302, { Location: portalSession.lastRedirect }).end();
  });
  attackerSite = await startSite((request, response) => {
    response.writeHead(200, { 'Content-Type': 'text/html' }).end('<!doctype html><title>Free airdrop</title><p>Hello</p>');
  });
  server = await startServer('signin', { SUPABASE_JWT_SECRET: SECRET, PORTAL_SIGNIN_URL: `${portal.base}/signin` });
  browser = await launchBrowser();
});

after(async () => {
  await browser?.close().catch(() => {});
  await server?.stop();
  await portal?.close();
  await attackerSite?.close();
});

/** A fresh browser context whose requests are watched for the attacker's token. */
async function freshContext() {
  const context = await browser.newContext();
  const sentAttackerToken = [];
  context.on('request', (request) => {
    if ((request.headers().authorization ?? '').includes(attackerToken)) sentAttackerToken.push(request.url());
  });
  return { context, sentAttackerToken };
}

const session = (page) => page.evaluate(() => JSON.parse(sessionStorage.getItem('tradeeon.session') || 'null'));
const email = (page) => page.locator('#account-email').innerText();

/** Signs `page` in through the portal as `user`, by the sign-in button, and checks who it shows. */
async function signInThroughPortal(page, user) {
  portalSession.user = user;
  await page.goto(`${server.base}/`);
  await page.locator('#signin-portal-button').click();
  await page.locator('#app').waitFor();
  await until(async () => (await email(page)) === user.email, { what: `${user.email} signed in` });
  assert.equal(page.url(), `${server.base}/`, 'the token and state are removed from the address bar');
  assert.equal(await page.evaluate(() => sessionStorage.getItem('tradeeon.signin')), null, 'the state is used up');
}

test('the portal signs a user in, and its answer works once', async () => {
  const { context } = await freshContext();
  const page = await context.newPage();
  watchPage(page, problems);
  const response = await page.goto(`${server.base}/`);
  assert.equal(response.headers()['cross-origin-opener-policy'], 'same-origin');
  await page.locator('#signin-portal').waitFor();
  assert.equal(await page.locator('#signin-local').isHidden(), true, 'no local links behind a portal');
  assert.equal(await page.locator('#signin-unavailable').isHidden(), true);
  await shot(page, 'portal-signin');

  await signInThroughPortal(page, VICTIM);
  assert.match(portalSession.lastRedirect, /[#&]state=/, 'the portal was given a state to return');
  await page.locator('#empty-state').waitFor();
  await shot(page, 'portal-signed-in');
  const victimToken = (await session(page)).token;

  // The portal's answer, replayed in a new page load of the same tab, is refused: its state is used.
  portalSession.user = OTHER;
  const replay = portalSession.lastRedirect.replace(`${server.base}/#`, `${server.base}/?replayed#`);
  await page.goto(replay);
  await page.locator('#app').waitFor();
  await until(async () => (await page.locator('#notice').innerText()).includes('not started from this page'), { what: 'the refusal notice' });
  assert.equal(await email(page), VICTIM.email);
  assert.equal((await session(page)).token, victimToken);
  await context.close();
});

test('a crafted link with a token signs no one in', async () => {
  const { context, sentAttackerToken } = await freshContext();
  const page = await context.newPage();
  watchPage(page, problems);
  for (const fragment of [
    `access_token=${attackerToken}&expires_in=3600`,
    `access_token=${attackerToken}&expires_in=3600&state=guessed`,
  ]) {
    await page.goto(`${server.base}/?n=${encodeURIComponent(fragment.length)}#${fragment}`);
    await page.locator('#signin').waitFor();
    await until(async () => (await page.locator('#signin-message').innerText()).includes('not started from this page'), { what: 'the refusal' });
    assert.equal(await session(page), null, 'no session was stored');
    assert.ok(!page.url().includes('access_token'), 'the token is removed from the address bar');
  }
  await shot(page, 'crafted-link-refused');

  // A pending sign-in of this tab does not help a link that carries another state, nor one
  // that comes back too late.
  await page.evaluate(() => sessionStorage.setItem('tradeeon.signin', JSON.stringify({ state: 'mine', startedAt: Date.now() })));
  await page.goto(`${server.base}/?again#access_token=${attackerToken}&state=not-mine`);
  await page.locator('#signin').waitFor();
  await until(async () => (await page.locator('#signin-message').innerText()).includes('not started from this page'), { what: 'the refusal' });
  await page.evaluate(() => sessionStorage.setItem('tradeeon.signin', JSON.stringify({ state: 'old', startedAt: Date.now() - 11 * 60_000 })));
  await page.goto(`${server.base}/?late#access_token=${attackerToken}&state=old`);
  await page.locator('#signin').waitFor();
  await until(async () => (await page.locator('#signin-message').innerText()).includes('not started from this page'), { what: 'the refusal' });
  assert.equal(await session(page), null);
  assert.deepEqual(sentAttackerToken, [], 'the attacker\'s token never reached the API');

  // The same link opened in a tab signed in as the victim leaves the victim signed in.
  await signInThroughPortal(page, VICTIM);
  const victimToken = (await session(page)).token;
  await page.goto(`${server.base}/?mail#access_token=${attackerToken}&expires_in=3600`);
  await page.locator('#app').waitFor();
  await until(async () => (await page.locator('#notice').innerText()).includes('not started from this page'), { what: 'the notice' });
  assert.equal(await email(page), VICTIM.email);
  assert.equal((await session(page)).token, victimToken);
  assert.deepEqual(sentAttackerToken, []);
  await context.close();
});

test('a fragment changed after load is ignored', async () => {
  const { context, sentAttackerToken } = await freshContext();
  const page = await context.newPage();
  watchPage(page, problems);
  await signInThroughPortal(page, VICTIM);
  const victimToken = (await session(page)).token;

  // Another script holding this window, or a link to the same page, changes only the fragment.
  await page.evaluate((t) => { location.hash = `access_token=${t}&expires_in=3600&state=x`; }, attackerToken);
  await until(async () => (await page.locator('#notice').innerText()).includes('ignored'), { what: 'the notice' });
  assert.ok(!page.url().includes('access_token'), 'the token is removed from the address bar');
  await page.goto(`${server.base}/#access_token=${attackerToken}`);
  await page.waitForTimeout(500);
  assert.equal(await email(page), VICTIM.email);
  assert.equal((await session(page)).token, victimToken);
  await shot(page, 'hashchange-ignored');
  assert.deepEqual(sentAttackerToken, []);
  await context.close();
});

test('a page that opened the UI cannot navigate it to a crafted link', async () => {
  const { context, sentAttackerToken } = await freshContext();
  const attackerPage = await context.newPage();
  await attackerPage.goto(`${attackerSite.base}/`);
  const opened = context.waitForEvent('page');
  await attackerPage.evaluate((url) => { window.victim = window.open(url); }, `${server.base}/`);
  const page = await opened;
  watchPage(page, problems);
  await page.waitForLoadState();
  await signInThroughPortal(page, VICTIM);
  const victimToken = (await session(page)).token;
  assert.equal(await page.evaluate(() => window.opener), null, 'the UI has no handle on its opener');

  // Later, the attacker's page tries to send the UI to its own token.
  const outcome = await attackerPage.evaluate((url) => {
    try {
      window.victim.location.href = url;
    } catch (error) {
      return `threw ${error.name}`;
    }
    return window.victim.closed ? 'severed' : 'navigated';
  }, `${server.base}/#access_token=${attackerToken}&expires_in=3600`);
  assert.equal(outcome, 'severed', 'Cross-Origin-Opener-Policy cuts the opener off');
  await page.waitForTimeout(1000);
  assert.equal(page.url(), `${server.base}/`);
  assert.equal(await email(page), VICTIM.email);
  assert.equal((await session(page)).token, victimToken);
  assert.deepEqual(sentAttackerToken, []);
  await context.close();
});

test('a sign-in for another account replaces the session only when the user says so', async () => {
  const { context } = await freshContext();
  const page = await context.newPage();
  watchPage(page, problems);
  await signInThroughPortal(page, VICTIM);
  const otherToken = accessToken(SECRET, OTHER);
  // As if the user had started a sign-in in this tab, and the portal answered for another account.
  const arrive = async (state) => {
    await page.evaluate((s) => sessionStorage.setItem('tradeeon.signin', JSON.stringify({ state: s, startedAt: Date.now() })), state);
    await page.goto(`${server.base}/?${state}#access_token=${otherToken}&expires_in=3600&state=${state}`);
    const dialog = page.locator('dialog.switch-account');
    await dialog.waitFor();
    const text = await dialog.innerText();
    assert.ok(text.includes(VICTIM.email) && text.includes(OTHER.email), `both accounts are named: ${text}`);
    return dialog;
  };

  let dialog = await arrive('first');
  await shot(page, 'switch-account');
  assert.equal(await page.evaluate(() => document.activeElement.textContent), `Stay signed in as ${VICTIM.email}`);
  await dialog.getByRole('button', { name: `Stay signed in as ${VICTIM.email}` }).click();
  await page.locator('#app').waitFor();
  await until(async () => (await email(page)) === VICTIM.email, { what: 'the victim still signed in' });
  assert.match(await page.locator('#notice').innerText(), /still signed in as victim@example\.com/);

  dialog = await arrive('second');
  await page.keyboard.press('Escape');
  await page.locator('#app').waitFor();
  assert.equal(await email(page), VICTIM.email, 'Escape keeps the account');

  dialog = await arrive('third');
  await dialog.getByRole('button', { name: `Switch to ${OTHER.email}` }).click();
  await until(async () => (await email(page)) === OTHER.email, { what: 'the switch' });
  assert.equal((await session(page)).token, otherToken);
  await context.close();
  assert.deepEqual(problems, []);
});
