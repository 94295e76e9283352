// The web console's whole flow in Debian's Chromium, driven by playwright-core. Started by
// tests/console.rs, which runs the server and reads this script's stdout: one JSON object a line,
// {"event": "device", ...} to start the real device agent and {"event": "client", ...} to start
// the real `iotunnel client` with the token read from the result dialog. Progress goes to stderr;
// a failed check throws and the script exits non-zero after saving a screenshot of the failure.
//
// Env: CONSOLE_URL (the server's API base), CONSOLE_API_KEY, CONSOLE_OUT (screenshot folder),
// CHROMIUM (the browser executable).
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { chromium } from 'playwright-core';
import { Checks, XSS } from './checks.mjs';

const env = (name) => {
  const v = process.env[name];
  if (!v) throw new Error(`${name} is not set (tests/console.rs sets it)`);
  return v;
};
const BASE = env('CONSOLE_URL');
const KEY = env('CONSOLE_API_KEY');
const OUT = env('CONSOLE_OUT');
const CHROMIUM = env('CHROMIUM');

const emit = (event) => process.stdout.write(`${JSON.stringify(event)}\n`);
const log = (msg) => process.stderr.write(`[console] ${msg}\n`);

const profile = mkdtempSync(join(tmpdir(), 'iotunnel-chromium-'));
const context = await chromium.launchPersistentContext(profile, {
  executablePath: CHROMIUM,
  headless: true,
  args: [
    '--no-sandbox', '--disable-gpu', '--no-first-run', '--disable-background-networking',
    '--disable-component-update', '--disable-sync', '--disable-quic',
  ],
  viewport: { width: 1280, height: 900 },
});
await context.grantPermissions(['clipboard-read', 'clipboard-write'], { origin: BASE });
const page = context.pages()[0] ?? await context.newPage();
const c = new Checks(page, OUT, log);

try {
  await scenario();
  c.finish();
  log('all steps passed');
} catch (err) {
  await c.shot('99-failure').catch(() => {});
  log(`FAILED: ${err.stack ?? err}`);
  process.exitCode = 1;
} finally {
  await context.close();
  rmSync(profile, { recursive: true, force: true });
}

async function scenario() {
  const row = (id) => page.locator(`#tunnel-rows tr[data-id="${id}"]`);

  // 1. Sign in: a wrong key shows the server's message; the right one (typed, Enter) signs in.
  await page.goto(`${BASE}/`);
  await c.visible('#page-signin');
  await c.text('#signin-help', (t) => t.includes('IOTUNNEL_ADMIN_KEY') && t.includes('iotunnel key create')
    && t.includes('iotunnel account create'), 'the sign-in page says where a key comes from');
  c.ok(await page.isHidden('#signin-status'), 'no "signed out" before signing in');
  await c.shot('01-signin');
  await page.fill('#signin-key', 'itk_wrong-key');
  await page.click('#signin-form button[type="submit"]');
  await c.text('#signin-error', /invalid API key/, 'the 401 message is shown');
  await c.shot('02-signin-error');
  await page.fill('#signin-key', KEY);
  await page.press('#signin-key', 'Enter');
  await c.visible('#page-tunnels');
  await c.visible('#sign-out');
  c.equal(await page.evaluate(() => sessionStorage.getItem('iotunnel.apiKey')), KEY, 'key in sessionStorage');
  c.equal(await page.evaluate(() => localStorage.length), 0, 'nothing in localStorage');

  // 2. A product whose name is hostile markup.
  const productName = `Cameras ${XSS}`;
  await page.click('nav a[data-page="products"]');
  await page.fill('#product-name', productName);
  await page.click('#product-form button[type="submit"]');
  const productRow = page.locator('#product-rows tr').first();
  await c.text(productRow.locator('td').first(), productName, 'the product name is plain text');
  const productKey = await productRow.getAttribute('data-key');
  await c.noXss('product list');
  await c.text('#banner-text', /^Product .* created: /, 'the product is announced');
  await c.shot('03-products');

  // 3. A device: its secret is shown once, and Copy puts it on the clipboard. The product's
  // notice stayed with the products page.
  await page.click('nav a[data-page="devices"]');
  await c.hidden('#banner');
  await c.value('#device-product', productKey);
  await page.fill('#device-name', 'cam-1');
  await page.click('#device-form button[type="submit"]');
  await c.visible('#dlg-secret');
  const secret = await page.textContent('#secret-value');
  c.match(secret, /^[A-Za-z0-9_-]{43}$/, 'the device secret is 256 bits, base64url');
  await c.text('#secret-command', (t) => t.includes(secret) && t.includes(`--product-key ${productKey}`)
    && t.includes('--ca-file '),
    'the agent command');
  await page.click('#secret-copy');
  await c.text('#secret-copied', /Copied/, 'Copy reports success');
  c.ok((await c.clipboard()).includes(secret), 'the clipboard holds the secret');
  await c.shot('04-device-secret');
  await page.keyboard.press('Escape');
  await c.hidden('#dlg-secret');
  await c.text('#device-rows tr[data-device="cam-1"]', /Offline/, 'the new device is offline');
  await c.text('#device-rows tr[data-device="cam-1"] [data-label="Open tunnels"]', 'None', 'no tunnel yet');
  // Errors show the API's message: the same name again is a conflict.
  await page.fill('#device-name', 'cam-1');
  await page.click('#device-form button[type="submit"]');
  await c.text('#device-error', /device already exists/, 'the 409 message is shown');

  // 4. No tunnel to an offline device: the dialog says why.
  await page.click('nav a[data-page="tunnels"]');
  await page.click('#create-tunnel');
  await c.visible('#dlg-create');
  c.equal(await page.textContent('#dlg-create-title'), await page.textContent('#create-tunnel'),
    'the dialog is titled like the button that opens it');
  await c.text('#create-device-why', /^This product's device is not online\. /, 'the reason no device is listed');
  await c.text('#create-device-why', (t) => !t.includes('(s)'), 'no "device(s)"');
  c.ok(await page.isDisabled('#create-ok'), 'OK is disabled without an online device');
  await sameLine('#dlg-create [data-close]', '#create-ok', 'Cancel and OK');
  await c.shot('05-create-offline');
  await page.click('#dlg-create [data-close]');

  // 5. The real device agent connects; the devices page shows it online (live refresh).
  emit({ event: 'device', product_key: productKey, device_name: 'cam-1', device_secret: secret });
  await page.click('nav a[data-page="devices"]');
  await c.text('#device-rows tr[data-device="cam-1"]', /Online/, 'the device comes online', 30_000);
  await c.shot('06-device-online');

  // 6. Create a tunnel with hostile custom info and description; read its token.
  await page.click('nav a[data-page="tunnels"]');
  const a = await createTunnel({ custom: XSS, description: XSS, lifetime: '60', shot: '07-create-dialog' });
  await c.shot('08-result-dialog');
  await c.text('#dlg-result .warning', /shown only once/, 'the once-only warning');
  await page.click('#result-copy');
  await c.text('#result-copied', /Copied/, 'Copy All reports success');
  const copied = await c.clipboard();
  for (const part of [a.id, a.token, a.url, a.endpoint, 'iotunnel client']) {
    c.ok(copied.includes(part), `Copy All includes ${part}`);
  }
  await page.click('#dlg-result [data-close]');
  // The real client dials the relay with exactly that token and URL.
  emit({ event: 'client', url: a.url, token: a.token });

  // 7. The list shows it, live: OPEN, device and client CONNECTED with an RTT.
  await c.text(row(a.id).locator('[data-label="State"]'), 'OPEN', 'the new tunnel is OPEN');
  await c.text(row(a.id).locator('[data-label="Product"]'), (t) => t.includes(productName), 'product name as text');
  await c.text(row(a.id).locator('[data-label="Device connection"]'), /CONNECTED\s*RTT [\d.]+ ms/,
    'the device side connects, with its RTT', 30_000);
  await c.text(row(a.id).locator('[data-label="Client connection"]'), /CONNECTED\s*RTT [\d.]+ ms/,
    'the client side connects with the token from the dialog, with its RTT', 30_000);
  await c.noXss('tunnel list');
  await c.shot('09-list-live');

  // 8. Search: by tunnel ID, then by product and device name.
  const b = await createTunnel({ description: 'second tunnel' });
  await page.click('#dlg-result [data-close]');
  await c.rows([b.id, a.id], 'both tunnels, newest first');
  await page.fill('#search-id', a.id);
  await page.click('#search-form button[type="submit"]');
  await c.rows([a.id], 'the search by ID finds exactly that tunnel');
  await c.shot('10-search-by-id');
  await page.fill('#search-id', 'no-such-tunnel');
  await page.click('#search-form button[type="submit"]');
  await c.rows([], 'an unknown ID finds nothing');
  await c.visible('#tunnel-empty');
  await page.fill('#search-id', '');
  await page.selectOption('#search-product', productKey);
  await page.fill('#search-device', 'cam-1');
  await page.click('#search-form button[type="submit"]');
  await c.rows([b.id, a.id], 'the search by product and device name');
  await page.fill('#search-device', 'cam-2');
  await page.click('#search-form button[type="submit"]');
  await c.rows([], 'another device name finds nothing');
  await page.click('#search-form button[type="reset"]');
  await c.rows([b.id, a.id], 'reset shows all');

  // 9. View: every field, hostile strings as text, live connection state and RTT.
  await row(a.id).getByRole('button', { name: `View tunnel ${a.id}` }).click();
  await c.visible('#dlg-view');
  await c.text('#view-fields', (t) => t.includes(a.id), 'the tunnel id');
  await c.text('#view-fields [data-field="description"]', XSS, 'the description is plain text');
  await c.text('#view-fields [data-field="custom_info"]', XSS, 'the custom info is plain text');
  await c.text('#view-fields', /Services\s*SSH/, 'the services');
  await c.text('#view-device [data-field="device-state"]', 'CONNECTED', 'the device side');
  await c.text('#view-client [data-field="client-state"]', 'CONNECTED', 'the client side');
  await c.text('#view-client [data-field="client-rtt"]', /^[\d.]+ ms$/, 'the client RTT');
  await c.text('#view-client', /Address\s*127\.0\.0\.1:\d+/, "the client's address");
  await c.noXss('view dialog');
  await c.shot('11-view');
  await page.keyboard.press('Escape');
  await c.hidden('#dlg-view');

  // 10. Close it: the confirmation warns; then CLOSED, both sides gone, Delete offered.
  c.equal(await row(b.id).getByRole('button', { name: /^Delete/ }).count(), 0, 'no Delete on an OPEN tunnel');
  await row(a.id).getByRole('button', { name: `Close Tunnel ${a.id}` }).click();
  await c.visible('#dlg-confirm');
  await c.text('#confirm-text', /immediately disconnects the client and the device/, 'the warning');
  await c.text('#confirm-text', /cannot reopen/, 'the warning says it is final');
  await c.shot('12-close-confirm');
  await page.click('#confirm-ok');
  await c.text(row(a.id).locator('[data-label="State"]'), 'CLOSED', 'the tunnel is CLOSED');
  await c.text(row(a.id).locator('[data-label="Client connection"]'), 'DISCONNECTED', 'the client is cut off');
  c.equal(await row(a.id).getByRole('button', { name: /^Close Tunnel/ }).count(), 0, 'no Close on a CLOSED tunnel');
  await c.shot('13-closed');

  // 11. Delete it: the row goes; describe answers 404.
  await row(a.id).getByRole('button', { name: `Delete tunnel ${a.id}` }).click();
  await c.visible('#dlg-confirm');
  await page.click('#confirm-ok');
  await c.rows([b.id], 'the deleted tunnel left the list');
  const status = await page.evaluate(async ([id, key]) => (await fetch(`/v1/tunnels/${id}`,
    { headers: { Authorization: `Bearer ${key}` } })).status, [a.id, KEY]);
  c.equal(status, 404, 'the deleted tunnel is gone from the API');
  await c.shot('14-deleted');

  // 12. Batch close two tunnels, then batch delete them with an OPEN one: per-tunnel results.
  const cc = await createTunnel({ description: 'third tunnel' });
  await page.click('#dlg-result [data-close]');
  const d = await createTunnel({ description: 'fourth tunnel' });
  await page.click('#dlg-result [data-close]');
  await c.rows([d.id, cc.id, b.id], 'three OPEN tunnels');
  await selectRows([b.id, cc.id]);
  await page.click('#batch-close');
  await c.text('#confirm-text', /immediately disconnects/, 'the batch close warning');
  await c.text('#confirm-list', (t) => t.includes(b.id) && t.includes(cc.id), 'the ids to close');
  await page.click('#confirm-ok');
  await c.visible('#dlg-batch');
  await c.text('#batch-summary', '2 of 2 closed.', 'the batch close summary');
  await batchResult(b.id, true, /Closed/);
  await batchResult(cc.id, true, /Closed/);
  await c.shot('15-batch-close');
  await page.click('#dlg-batch [data-close]');
  await c.text(row(b.id).locator('[data-label="State"]'), 'CLOSED', 'batch closed b');
  await c.text(row(cc.id).locator('[data-label="State"]'), 'CLOSED', 'batch closed c');
  await c.text(row(d.id).locator('[data-label="State"]'), 'OPEN', 'd stays OPEN');

  await selectRows([b.id, cc.id, d.id]);
  await page.click('#batch-delete');
  await page.click('#confirm-ok');
  await c.visible('#dlg-batch');
  await c.text('#batch-summary', '2 of 3 deleted.', 'the batch delete summary');
  await batchResult(b.id, true, /Deleted/);
  await batchResult(cc.id, true, /Deleted/);
  await batchResult(d.id, false, /Failed\s*only a CLOSED tunnel can be deleted/);
  await c.shot('16-batch-delete');
  await page.click('#dlg-batch [data-close]');
  await c.rows([d.id], 'only the OPEN tunnel is left');

  // 13. Pagination: five more tunnels (made through the API: the dialog is covered above), five
  // a page.
  const fillers = await page.evaluate(async ([key, pk]) => {
    const ids = [];
    for (let i = 1; i <= 5; i += 1) {
      const r = await fetch('/v1/tunnels', {
        method: 'POST',
        headers: { Authorization: `Bearer ${key}`, 'Content-Type': 'application/json' },
        body: JSON.stringify({ product_key: pk, device_name: 'cam-1', description: `filler ${i}` }),
      });
      ids.unshift((await r.json()).tunnel_id);
    }
    return ids;
  }, [KEY, productKey]);
  await page.selectOption('#page-size', '5');
  await c.rows(fillers, 'the first page holds the five newest');
  c.ok(await page.isDisabled('#page-prev'), 'no previous page on page 1');
  c.ok(await page.$eval('#page-tunnels .table-wrap', (w) => w.scrollWidth <= w.clientWidth),
    'the list fits 1280 px without scrolling sideways');
  await c.shot('17-pagination');
  await page.click('#page-next');
  await c.rows([d.id], 'the second page holds the oldest');
  await c.text('#page-number', 'Page 2', 'the page number');
  c.ok(await page.isDisabled('#page-next'), 'no next page after the last');
  await page.click('#page-prev');
  await c.rows(fillers, 'back on page 1');
  await page.selectOption('#page-size', '20');
  const all = [...fillers, d.id];
  await c.rows(all, 'all six on one page');

  // 14. Keyboard: Create Secure Tunnel opens with Enter and closes with Escape.
  await page.focus('#create-tunnel');
  await page.keyboard.press('Enter');
  await c.visible('#dlg-create');
  await page.keyboard.press('Escape');
  await c.hidden('#dlg-create');

  // 15. 390 px wide: no horizontal scrolling; the rows turn into cards.
  await page.setViewportSize({ width: 390, height: 844 });
  await c.rows(all, 'the list at 390 px');
  c.ok(await page.evaluate(() => document.documentElement.scrollWidth <= 390), 'no horizontal scroll at 390 px');
  c.equal(await page.locator('#tunnel-table thead').evaluate((t) => t.getBoundingClientRect().height <= 1),
    true, 'the table header is folded into the cards');
  await c.shot('18-mobile-tunnels', { fullPage: true });
  await row(d.id).getByRole('button', { name: `View tunnel ${d.id}` }).click();
  await c.visible('#dlg-view');
  await c.text('#view-device [data-field="device-state"]', 'CONNECTED', 'view at 390 px');
  await c.shot('19-mobile-view');
  await page.keyboard.press('Escape');
  await page.click('nav a[data-page="products"]');
  await c.visible('#page-products');
  await c.shot('20-mobile-products', { fullPage: true });
  // The device command wraps between words at 390 px, never inside a flag.
  await page.click('nav a[data-page="devices"]');
  await c.text('#device-rows tr[data-device="cam-1"] [data-label="Open tunnels"]', `${all.length} open`,
    'the open tunnels at 390 px');
  c.ok(await page.evaluate(() => document.documentElement.scrollWidth <= 390), 'no horizontal scroll on Devices');
  await c.shot('20a-mobile-devices', { fullPage: true });
  await page.fill('#device-name', 'cam-2');
  await page.click('#device-form button[type="submit"]');
  await c.visible('#dlg-secret');
  const flags = await page.$$eval('#secret-command .flag', (spans) => spans.map((f) => ({
    text: f.textContent, lines: f.getClientRects().length, top: Math.round(f.getBoundingClientRect().top),
  })));
  c.ok(flags.length >= 3, `the command's flags are marked (${JSON.stringify(flags)})`);
  for (const f of flags) c.equal(f.lines, 1, `${f.text} stays on one line`);
  c.ok(new Set(flags.map((f) => f.top)).size > 1, 'at 390 px the command wraps over several lines');
  c.ok(await page.$eval('#secret-command', (p) => p.scrollWidth <= p.clientWidth), 'the command fits 390 px');
  await c.shot('20b-mobile-device-command');
  await page.keyboard.press('Escape');
  await c.hidden('#dlg-secret');
  await page.setViewportSize({ width: 1280, height: 900 });

  // 16. Devices: each with its state and OPEN tunnels (a link to them); Delete asks first,
  // closes its tunnels and tells its agent.
  const cam1 = page.locator('#device-rows tr[data-device="cam-1"]');
  await c.text(cam1.locator('[data-label="Status"]'), 'Online', 'cam-1 is online');
  await c.text(cam1.locator('[data-label="Open tunnels"]'), `${all.length} open`, "cam-1's open tunnels");
  await c.text('#device-rows tr[data-device="cam-2"] [data-label="Status"]', 'Offline', 'cam-2 has no agent');
  await c.shot('20c-devices');
  await cam1.getByRole('link', { name: 'Open tunnels of cam-1' }).click();
  await c.visible('#page-tunnels');
  await c.value('#search-device', 'cam-1');
  await c.value('#search-state', 'OPEN');
  await c.rows(all, "the link lists cam-1's OPEN tunnels");
  await page.click('nav a[data-page="devices"]');
  await cam1.getByRole('button', { name: 'Delete device cam-1' }).click();
  await c.visible('#dlg-confirm');
  await c.text('#dlg-confirm-title', 'Delete Device', 'the confirmation title');
  await c.text('#confirm-text', new RegExp(`closes its ${all.length} open tunnels at once`), 'the warning counts the tunnels');
  await c.text('#confirm-text', /cannot undo/, 'the warning says it is final');
  await c.text('#confirm-list', 'cam-1', 'the device to delete');
  await sameLine('#dlg-confirm button[value="cancel"]', '#confirm-ok', 'Cancel and Delete Device');
  await c.shot('20d-device-delete-confirm');
  await page.click('#confirm-ok');
  await c.text('#banner-text', `Device cam-1 deleted; ${all.length} tunnels closed.`, 'the deletion is announced');
  await c.until(async () => (await cam1.count()) === 0, 'cam-1 left the list', () => cam1.count());
  await c.text('#device-rows', /cam-2/, 'cam-2 stays');
  await c.shot('20e-device-deleted');
  await page.click('nav a[data-page="tunnels"]');
  await c.hidden('#banner');
  await c.rows([], 'no OPEN tunnel of cam-1 is left (the search from the link stays)');
  await page.click('#search-form button[type="reset"]');
  await c.rows(all, 'reset shows them all');
  await c.text(row(d.id).locator('[data-label="State"]'), 'CLOSED', "the device's tunnels closed");

  // 17. Sign out: the key is forgotten, and the page says so.
  await page.click('#sign-out');
  await c.visible('#page-signin');
  await c.text('#signin-status', /^You are signed out\./, 'signing out says so');
  c.ok(await page.isHidden('#signin-error'), 'a sign-out is not an error');
  c.equal(await page.evaluate(() => sessionStorage.length), 0, 'sign-out forgets the key');
  c.equal(await page.locator('#tunnel-rows tr').count(), 0, 'no data left on the page');
  await c.shot('21-signed-out');
  await c.noXss('end');
}

/** Creates a tunnel through the dialog; returns what the result dialog shows. */
async function createTunnel({ custom = '', description = '', lifetime = '', shot = null }) {
  await page.click('#create-tunnel');
  await c.visible('#dlg-create');
  await c.text('#create-device-why', /Only online devices are listed/, 'the online device is listed');
  await page.selectOption('#create-device', 'cam-1');
  await page.fill('#create-custom', custom);
  await page.fill('#create-description', description);
  await page.fill('#create-services', 'SSH');
  await page.fill('#create-lifetime', lifetime);
  if (shot) await c.shot(shot);
  await page.click('#create-ok');
  await c.visible('#dlg-result');
  const t = {
    id: await page.textContent('#result-id'),
    token: await page.textContent('#result-token'),
    url: await page.textContent('#result-url'),
    endpoint: await page.textContent('#result-endpoint'),
  };
  c.match(t.id, /^\S+$/, 'a tunnel id');
  c.match(t.token, /^[A-Za-z0-9_-]{43}$/, 'the client token is 256 bits, base64url');
  c.ok(t.url === `wss://${t.endpoint}/tunnel/${t.id}/source`, `the client URL ${t.url} names the tunnel`);
  await c.text('#result-command', (s) => s.includes(t.token) && s.includes(t.url) && s.includes('iotunnel client'),
    'the client command');
  log(`created tunnel ${t.id}`);
  return t;
}

/** Both controls sit on one line: same top and height (the create dialog's Cancel and OK). */
async function sameLine(a, b, what) {
  const [ra, rb] = [await page.locator(a).boundingBox(), await page.locator(b).boundingBox()];
  c.ok(ra && rb, `${what} are visible`);
  c.ok(Math.abs(ra.y - rb.y) < 0.5 && Math.abs(ra.height - rb.height) < 0.5,
    `${what} are aligned: ${JSON.stringify([ra, rb])}`);
}

/** Ticks the rows of `ids` (and only those). */
async function selectRows(ids) {
  for (const box of await page.locator('#tunnel-rows input[type="checkbox"]').all()) await box.uncheck();
  for (const id of ids) {
    await page.locator(`#tunnel-rows tr[data-id="${id}"] input[type="checkbox"]`).check();
  }
  await c.text('#selected-count', `${ids.length} selected`, 'the selection count');
}

async function batchResult(id, ok, re) {
  const r = page.locator(`#batch-rows tr[data-id="${id}"]`);
  c.equal(await r.getAttribute('data-ok'), String(ok), `batch result of ${id}`);
  await c.text(r, re, `batch result text of ${id}`);
}
