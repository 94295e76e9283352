// Assertions for the console scenario (playwright-core has no `expect`): each waits a bounded
// time for the page to reach a state, then fails with what it saw.
import { mkdirSync } from 'node:fs';
import { join } from 'node:path';

/** Hostile markup used as product name, custom info and description. */
export const XSS = '<img src=x onerror="window.__xss=1">';

const DEFAULT_WAIT_MS = 15_000;
const POLL_MS = 100;

export class Checks {
  constructor(page, outDir, log) {
    this.page = page;
    this.out = outDir;
    this.log = log;
    this.problems = [];
    mkdirSync(outDir, { recursive: true });
    // Anything the page does wrong on its own is a failure: script errors, CSP violations,
    // alert()s.
    page.on('pageerror', (e) => this.problems.push(`page error: ${e.message}`));
    page.on('console', (m) => {
      if (/Content Security Policy|Refused to/i.test(m.text())) this.problems.push(`CSP: ${m.text()}`);
    });
    page.on('dialog', (d) => {
      this.problems.push(`unexpected ${d.type()}: ${d.message()}`);
      d.dismiss();
    });
  }

  /** Saves a screenshot named after the step. */
  async shot(name, opts = {}) {
    const path = join(this.out, `${name}.png`);
    await this.page.screenshot({ path, ...opts });
    this.log(`screenshot ${path}`);
  }

  ok(cond, what) {
    if (!cond) throw new Error(`check failed: ${what}`);
  }

  equal(got, want, what) {
    if (got !== want) throw new Error(`check failed: ${what}: got ${JSON.stringify(got)}, want ${JSON.stringify(want)}`);
  }

  match(got, re, what) {
    if (typeof got !== 'string' || !re.test(got)) throw new Error(`check failed: ${what}: ${JSON.stringify(got)} !~ ${re}`);
  }

  locator(target) {
    return typeof target === 'string' ? this.page.locator(target) : target;
  }

  /** Waits until `cond()` is true; `describe()` says what was seen instead. */
  async until(cond, what, describe, timeout = DEFAULT_WAIT_MS) {
    const deadline = Date.now() + timeout;
    for (;;) {
      if (await cond().catch(() => false)) return;
      if (Date.now() > deadline) {
        const seen = await describe().catch((e) => `(${e.message})`);
        throw new Error(`timed out after ${timeout} ms: ${what}; saw ${JSON.stringify(seen)}`);
      }
      await new Promise((r) => setTimeout(r, POLL_MS));
    }
  }

  async visible(sel) {
    await this.locator(sel).first().waitFor({ state: 'visible', timeout: DEFAULT_WAIT_MS });
  }

  async hidden(sel) {
    await this.locator(sel).first().waitFor({ state: 'hidden', timeout: DEFAULT_WAIT_MS });
  }

  /**
   * Waits until the element's text (whitespace collapsed) equals a string, matches a RegExp, or
   * passes a predicate.
   */
  async text(target, want, what, timeout) {
    const loc = this.locator(target).first();
    const read = async () => (await loc.textContent({ timeout: 1000 })).replace(/\s+/g, ' ').trim();
    const test = (t) => (typeof want === 'string' ? t === want : want instanceof RegExp ? want.test(t) : want(t));
    await this.until(async () => test(await read()), what, read, timeout);
  }

  async value(sel, want) {
    const loc = this.locator(sel);
    await this.until(async () => (await loc.inputValue()) === want, `${sel} = ${want}`, () => loc.inputValue());
  }

  /** Waits until the tunnel list shows exactly these ids, in order. */
  async rows(ids, what) {
    const read = () => this.page.$$eval('#tunnel-rows tr', (trs) => trs.map((tr) => tr.dataset.id));
    await this.until(async () => JSON.stringify(await read()) === JSON.stringify(ids), what, read);
  }

  /** The hostile strings never ran and never became elements. */
  async noXss(where) {
    const r = await this.page.evaluate(() => ({ xss: window.__xss, imgs: document.querySelectorAll('img').length }));
    this.equal(r.xss, undefined, `window.__xss stays undefined (${where})`);
    this.equal(r.imgs, 0, `no <img> element was injected (${where})`);
  }

  async clipboard() {
    return this.page.evaluate(() => navigator.clipboard.readText());
  }

  /** Fails on anything the page reported by itself. */
  finish() {
    if (this.problems.length) throw new Error(`the page reported problems:\n${this.problems.join('\n')}`);
  }
}
