// End-to-end test of ouro's web console in headless Chromium.
// Usage: node console.test.mjs <base-url> <admin-key> <out-dir>
// Run by server/tests/console.rs against a real `ouro serve --admin-key ...`.
import { chromium } from 'playwright-core';
import { existsSync, mkdirSync } from 'node:fs';
import { join } from 'node:path';

const [base, adminKey, outDir] = process.argv.slice(2);
if (!base || !adminKey || !outDir) {
  console.error('usage: node console.test.mjs <base-url> <admin-key> <out-dir>');
  process.exit(2);
}
const executablePath = process.env.OURO_CHROMIUM || '/usr/bin/chromium';
if (!existsSync(executablePath)) {
  console.error(`${executablePath} not found: install Debian's chromium (apt-get install -y --no-install-recommends chromium chromium-driver)`);
  process.exit(2);
}
mkdirSync(outDir, { recursive: true });

const t0 = Date.now();
const step = (m) => console.log(`[${((Date.now() - t0) / 1000).toFixed(1)}s] ${m}`);
function assert(cond, msg) { if (!cond) throw new Error(`assertion failed: ${msg}`); }

const browser = await chromium.launch({ executablePath, headless: true, args: ['--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage'] });
let page;
let failed = false;
try {
  const context = await browser.newContext({ viewport: { width: 1280, height: 900 } });
  page = await context.newPage();
  page.setDefaultTimeout(30000);
  const pageErrors = [];
  page.on('pageerror', (e) => pageErrors.push(String(e)));
  page.on('console', (m) => { if (m.type() === 'error') console.log(`browser console: ${m.text()}`); });

  // ---- load
  await page.goto(`${base}/console`);
  assert((await page.title()) === 'ouro console', 'page title');
  step('console loaded');

  // ---- chat: a streamed answer appears token by token
  await page.fill('#chat-temp', '0');
  await page.fill('#chat-max', '40');
  await page.fill('#chat-input', 'Write one short sentence about the sea.');
  await page.click('#chat-send');
  await page.waitForSelector('.answer .text .tok');
  const firstText = await page.textContent('.answer .text');
  step(`streaming started: ${JSON.stringify(firstText)}`);
  await page.waitForSelector('.answer[data-done]', { timeout: 60000 });
  const done = await page.getAttribute('.answer', 'data-done');
  const answer = await page.textContent('.answer .text');
  const stats = await page.textContent('.answer .stats');
  step(`answer: ${JSON.stringify(answer)} | ${stats}`);
  assert(done === '1', `chat answer failed: ${stats}`);
  assert(answer.trim().length > 0, 'the answer has text');
  // tokens/s, and the finish chunk's `ouro.spec` (mean acceptance length, drafter).
  assert(/\d tok\/s/.test(stats) && /mean acceptance length \d/.test(stats) && /drafter (ngram|speculator|none)/.test(stats), `per-answer stats shown: ${stats}`);
  const provenance = await page.evaluate(() => ({
    target: document.querySelectorAll('.answer .tok-target').length,
    drafted: document.querySelectorAll('.answer .tok-ngram, .answer .tok-speculator').length,
  }));
  step(`tokens: ${JSON.stringify(provenance)}`);
  assert(provenance.target >= 1, 'target tokens shown');
  await page.screenshot({ path: join(outDir, 'chat.png'), fullPage: true });

  // ---- learning: charts, and admin actions refused without the key, done with it
  await page.click('#tabs button[data-view="learning"]');
  await page.waitForFunction(() => document.querySelectorAll('#chart-tps circle.pt').length >= 1, null, { timeout: 20000 });
  const points = await page.evaluate(() => ({
    tps: document.querySelectorAll('#chart-tps circle.pt').length,
    acceptance: document.querySelectorAll('#chart-acceptance circle.pt').length,
  }));
  step(`learning chart points: ${JSON.stringify(points)}`);
  assert(points.tps >= 1, 'the tokens/s chart has a point');

  // Clicks an admin button and waits for the action's outcome.
  const admin = async (button) => {
    await page.click(button);
    await page.waitForFunction(() => { const m = document.querySelector('#admin-msg'); return !m.dataset.busy && m.textContent !== ''; }, null, { timeout: 90000 });
    return { ok: (await page.getAttribute('#admin-msg', 'class')).includes('ok'), msg: await page.textContent('#admin-msg') };
  };
  let r = await admin('#btn-pause');
  step(`without the key: ${r.msg}`);
  assert(!r.ok && /Refused \(401\)/.test(r.msg), `refusal shown: ${r.msg}`);
  assert(await page.isVisible('#admin-msg.error'), 'the refusal is visible');

  await page.fill('#admin-key', adminKey);
  await page.click('#keys-save');
  const stored = await page.evaluate(() => ({ session: sessionStorage.getItem('ouro.adminKey'), local: localStorage.length }));
  assert(stored.session === adminKey && stored.local === 0, 'the admin key is kept in sessionStorage only');
  // The trainer may still be starting (503): retry for a while.
  for (let i = 0; i < 30; i++) {
    r = await admin('#btn-pause');
    if (r.ok) break;
    step(`pause not yet done: ${r.msg}`);
    await page.waitForTimeout(1000);
  }
  step(`with the key: ${r.msg}`);
  assert(r.ok && /Done: pause/.test(r.msg) && /paused/.test(r.msg), `pause done: ${r.msg}`);
  await page.waitForFunction(() => /state: paused/.test(document.querySelector('#trainer-status').textContent));
  r = await admin('#btn-resume');
  assert(r.ok && /trainer running/.test(r.msg), `resume done: ${r.msg}`);

  await page.waitForSelector('#spec-versions table');
  step(`versions: ${(await page.textContent('#spec-versions')).slice(0, 120)}`);
  await page.waitForTimeout(500);
  await page.screenshot({ path: join(outDir, 'learning.png'), fullPage: true });

  // ---- experiences: refused without the admin key (as the admin buttons are), then add, edit, reload, still there
  await page.click('#tabs button[data-view="experiences"]');
  await page.click('#keys-clear');
  assert(/admin key not set/.test(await page.textContent('#keys-state')), 'the keys are forgotten');
  await page.fill('#exp-new-name', 'console-test');
  await page.fill('#exp-new-text', 'Always restate the question briefly before answering it.');
  await page.click('#exp-add');
  await page.waitForFunction(() => /^add: Refused/.test(document.querySelector('#exp-msg').textContent));
  const refusedAdd = await page.textContent('#exp-msg');
  step(`add without the key: ${refusedAdd}`);
  assert(/Refused \(401\)/.test(refusedAdd) && /experiences:write/.test(refusedAdd), `the refusal names the key and scope needed: ${refusedAdd}`);
  assert(await page.isVisible('#exp-msg.error'), 'the refusal is visible');
  await page.click('#exp-refresh');
  await page.waitForTimeout(300);
  assert(!(await page.isVisible('#exp-list li[data-name="console-test"]')), 'a refused add writes nothing');
  await page.fill('#admin-key', adminKey);
  await page.click('#keys-save');
  await page.click('#exp-add');
  await page.waitForFunction(() => /Added to console-test/.test(document.querySelector('#exp-msg').textContent));
  await page.waitForSelector('#exp-detail .item .edit');
  await page.click('#exp-detail .item .edit');
  const edited = 'Check every arithmetic step twice and put the final answer inside boxed braces.';
  await page.fill('#exp-detail .item .edit-text', edited);
  await page.click('#exp-detail .item .save');
  await page.waitForFunction(() => /Saved item/.test(document.querySelector('#exp-msg').textContent));
  step(await page.textContent('#exp-msg'));
  await page.reload();
  await page.click('#tabs button[data-view="experiences"]');
  await page.click('#exp-list li[data-name="console-test"]');
  await page.waitForSelector('#exp-detail .item .text');
  const persisted = await page.textContent('#exp-detail .item .text');
  assert(persisted === edited, `edited item persisted after reload: ${persisted}`);
  assert(/admin key set/.test(await page.textContent('#keys-state')), 'the admin key survives a reload (sessionStorage)');
  step('edited item persisted after reload');
  // Each version shows where it came from: both changes were made with the admin key.
  await page.waitForSelector('#exp-versions tr[data-version]');
  const versions = await page.evaluate(() => [...document.querySelectorAll('#exp-versions tr[data-version]')].map((r) => ({
    v: Number(r.dataset.version), source: r.querySelector('.source').textContent, origin: r.querySelector('.origin').textContent,
  })));
  step(`versions: ${JSON.stringify(versions)}`);
  const edits = versions.filter((v) => v.source === 'edit');
  assert(edits.length === 2 && edits.every((v) => v.origin === 'by admin'), `the edits are recorded as made with the admin key: ${JSON.stringify(versions)}`);
  assert(versions.some((v) => v.source === 'create' && v.origin === 'by admin'), `the creation too: ${JSON.stringify(versions)}`);
  assert(!JSON.stringify(versions).includes(adminKey), 'the key itself is never shown');
  await page.screenshot({ path: join(outDir, 'experiences.png'), fullPage: true });

  // ---- KV and load
  await page.click('#tabs button[data-view="load"]');
  await page.waitForFunction(() => /%/.test(document.querySelector('#kv-usage').textContent));
  await page.waitForFunction(() => document.querySelectorAll('#chart-load circle.pt').length >= 1);
  step(`KV ${await page.textContent('#kv-usage')}, running ${await page.textContent('#req-running')}, waiting ${await page.textContent('#req-waiting')}`);
  await page.screenshot({ path: join(outDir, 'load.png'), fullPage: true });

  assert(pageErrors.length === 0, `no uncaught page errors: ${pageErrors.join('; ')}`);
  step('all console checks passed');
} catch (e) {
  failed = true;
  console.error(e.stack || String(e));
  if (page) await page.screenshot({ path: join(outDir, 'failure.png'), fullPage: true }).catch(() => {});
} finally {
  await browser.close();
}
process.exit(failed ? 1 : 0);
