// The web console in a real browser: Debian's Chromium (/usr/bin/chromium)
// driven by playwright-core (pinned in package-lock.json; it downloads no
// browser). Starts its own `ebb serve` with a token and a copy of the example
// projections (one of them is broken and mended on disk), then goes through
// the console as a user would. Run by scripts/test; prints busted's summary
// line ("N successes / N failures / N errors / 0 pending") so the counts
// join the suite's.
//
// Screenshots of every page go to $EBB_CONSOLE_SHOTS (default: a temporary
// directory); `EBB_CONSOLE_SHOTS=docs/console scripts/test spec/browser`
// refreshes the README's.
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';

const here = path.dirname(fileURLToPath(import.meta.url));
const root = path.resolve(here, '../..');
const build = process.env.EBB_BUILD || path.join(root, 'build');
const shots = process.env.EBB_CONSOLE_SHOTS
  ? path.resolve(root, process.env.EBB_CONSOLE_SHOTS)
  : fs.mkdtempSync(path.join(os.tmpdir(), 'ebb-console-shots-'));
const TOKEN = 's3cret';
const WAIT = 30000; // bounded waits: generous, never a timing assertion

const results = [];
async function test(name, fn) {
  try {
    await fn();
    results.push({ name, ok: true });
    process.stdout.write('+');
  } catch (e) {
    results.push({ name, ok: false, error: e });
    process.stdout.write('-');
  }
}
function assert(cond, msg) { if (!cond) throw new Error(msg); }

// ---------------------------------------------------------------- the daemon

const data = fs.mkdtempSync(path.join(os.tmpdir(), 'ebb-console-data-'));
const projections = fs.mkdtempSync(path.join(os.tmpdir(), 'ebb-console-proj-'));
for (const f of fs.readdirSync(path.join(root, 'projections')))
  fs.copyFileSync(path.join(root, 'projections', f), path.join(projections, f));
const balancesFile = path.join(projections, 'account_balances.lua');
const balancesText = fs.readFileSync(balancesFile, 'utf8');

function startDaemon() {
  const args = ['serve', '--data', data, '--aggregates', path.join(root, 'aggregates'), '--projections', projections,
    '--listen', '127.0.0.1:0', '--durability', 'normal', '--token', TOKEN];
  if (process.env.EBB_TEST_STORE === 'postgres' && process.env.EBB_TEST_PG_URI) args.push('--store', process.env.EBB_TEST_PG_URI);
  const child = spawn(path.join(build, 'ebb'), args, { stdio: ['ignore', 'pipe', 'pipe'] });
  let log = '';
  child.stderr.on('data', (b) => { log += b; });
  return new Promise((resolve, reject) => {
    let out = '';
    const timer = setTimeout(() => reject(new Error('the daemon did not start: ' + log)), WAIT);
    child.stdout.on('data', (b) => {
      out += b;
      const m = /ebb listening on (http:\/\/\S+)/.exec(out);
      if (m) { clearTimeout(timer); resolve({ child, url: m[1], log: () => log }); }
    });
    child.on('exit', (code) => { clearTimeout(timer); reject(new Error(`the daemon exited (${code}): ${log}`)); });
  });
}

async function call(d, method, p, body) {
  const r = await fetch(d.url + p, {
    method, headers: { Authorization: 'Bearer ' + TOKEN, 'Content-Type': 'application/json' },
    body: body ? JSON.stringify(body) : undefined,
  });
  return { status: r.status, data: await r.json().catch(() => null) };
}

// ---------------------------------------------------------------- the browser

// Every request a page makes, to check that none to the API goes without
// the token: the page's own files and the one /health probe are public.
const untokened = [];
function watchRequests(page) {
  page.on('request', (req) => {
    const u = new URL(req.url());
    if (u.pathname.startsWith('/console/') || u.pathname === '/' || u.pathname === '/health' || !u.pathname) return;
    if (req.headers().authorization !== 'Bearer ' + TOKEN) untokened.push(`${req.method()} ${u.pathname}${u.search}`);
  });
}

const pageErrors = [];
async function openPage(context, d, hash) {
  const page = await context.newPage();
  page.on('pageerror', (e) => pageErrors.push(e.message));
  page.on('dialog', (dialog) => dialog.accept());
  watchRequests(page);
  await page.goto(d.url + '/' + (hash || ''));
  // The daemon has a token: the page asks for it once, in its dialog.
  await page.locator('#token-input').fill(TOKEN, { timeout: WAIT });
  await page.locator('#token-form button[type=submit]').click();
  await page.locator('main h1').first().waitFor({ timeout: WAIT });
  return page;
}

async function goto(page, hash) {
  await page.evaluate((h) => { location.hash = h; }, hash);
  await page.locator('main h1').first().waitFor({ timeout: WAIT });
}

async function main() {
  const started = Date.now();
  const d = await startDaemon();
  const browser = await chromium.launch({
    executablePath: process.env.EBB_CHROMIUM || '/usr/bin/chromium',
    args: ['--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage'],
  });
  const context = await browser.newContext({ viewport: { width: 1280, height: 800 }, timezoneId: 'Europe/Paris' });
  context.setDefaultTimeout(WAIT);
  let main, tail;
  try {
    // Some history for the pages to show.
    for (const [id, owner] of [['alice', 'Alice'], ['bob', 'Bob']]) {
      const r = await call(d, 'POST', '/commands', { aggregate: 'BankAccount', id, type: 'OpenAccount', data: { owner, initial_deposit: 1000 } });
      assert(r.status === 200, 'seed: ' + JSON.stringify(r));
    }
    await call(d, 'POST', '/commands', { aggregate: 'Order', id: 'o-1', type: 'CreateOrder', data: { customer_id: 'alice' } });
    await call(d, 'POST', '/streams/Order-old', { events: [{ type: 'OrderCreated', schema: 1, data: { customer_id: 'old' } }] });

    await test('asks for the token once, keeps it for the tab, and loads every page', async () => {
      main = await openPage(context, d, '');
      assert(await main.evaluate(() => sessionStorage.getItem('ebb.token')) === TOKEN, 'token not in sessionStorage');
      assert(!main.url().includes(TOKEN), 'the token is in the URL');
      const pages = [['overview', 'Overview'], ['streams', 'Streams'], ['trace', 'Trace'], ['tail', 'Live tail'],
        ['aggregate', 'Aggregate'], ['send', 'Send a command'], ['projections', 'Projections']];
      for (const [name, title] of pages) {
        await goto(main, '#/' + name);
        await main.locator('main h1', { hasText: title }).waitFor();
        assert(!(await main.locator('#token-dialog').evaluate((x) => x.open)), `the token was asked again on ${name}`);
      }
      await goto(main, '#/streams');
      await main.locator('main td a', { hasText: 'BankAccount-alice' }).waitFor();
      await main.locator('main td a', { hasText: 'BankAccount-alice' }).click();
      await main.locator('main .event .type', { hasText: 'AccountOpened' }).waitFor();
      // upcast by default, as stored with the toggle
      await goto(main, '#/stream/Order-old');
      await main.locator('#st-events .event', { hasText: 'schema 2' }).waitFor();
      await main.locator('#st-raw').check();
      await main.locator('#st-events .event', { hasText: 'schema 2' }).waitFor({ state: 'detached' });
      await main.locator('#st-events .event .type', { hasText: 'OrderCreated' }).waitFor();
      assert(pageErrors.length === 0, 'page errors: ' + pageErrors.join('; '));
    });

    await test('a command sent from the form appears in the live tail, and its trace opens', async () => {
      tail = await openPage(context, d, '#/tail');
      await tail.locator('#l-state', { hasText: 'live' }).waitFor();
      await goto(main, '#/send');
      await main.locator('#s-aggregate option[value=BankAccount]').waitFor({ state: 'attached' });
      await main.selectOption('#s-aggregate', 'BankAccount');
      await main.selectOption('#s-type', 'OpenAccount');
      await main.fill('#s-id', 'web-1');
      await main.fill('#s-data', '{"owner": "Web", "initial_deposit": 100}');
      await main.fill('#s-command-id', 'open-web-1');
      await main.click('#s-form button[type=submit]');
      await main.locator('#s-result h2', { hasText: 'Done' }).waitFor();
      await tail.locator('#l-events .event', { hasText: 'BankAccount-web-1' }).waitFor();
      await main.click('#s-trace');
      await main.locator('.tree', { hasText: 'AccountOpened' }).waitFor();
      await main.locator('.tree code', { hasText: 'open-web-1' }).waitFor();
      await main.locator('.tree a', { hasText: 'BankAccount-web-1' }).waitFor();
      // An error is shown with its code and details.
      await goto(main, '#/send');
      await main.locator('#s-aggregate option[value=BankAccount]').waitFor({ state: 'attached' });
      await main.selectOption('#s-type', 'Withdraw');
      await main.fill('#s-id', 'web-1');
      await main.fill('#s-data', '{"amount": 5000}');
      await main.click('#s-form button[type=submit]');
      await main.locator('#s-result', { hasText: 'insufficient funds' }).waitFor();
    });

    await test('the live tail pauses and resumes without a gap', async () => {
      await tail.click('#l-toggle');
      await tail.locator('#l-state', { hasText: 'paused' }).waitFor();
      for (let i = 1; i <= 3; i++)
        assert((await call(d, 'POST', '/commands', { aggregate: 'BankAccount', id: 'web-1', type: 'Deposit', data: { amount: i } })).status === 200, 'deposit');
      await tail.click('#l-toggle');
      for (const balance of [101, 103, 106])
        await tail.locator('#l-events .event', { hasText: `"balance": ${balance}` }).waitFor();
      assert(await tail.locator('#l-events .event', { hasText: 'MoneyDeposited' }).count() === 3, 'an event twice or missing');
    });

    await test('the aggregate slider moves through versions and shows what each step changed', async () => {
      await goto(main, '#/aggregate?type=BankAccount&id=web-1');
      await main.locator('#a-state', { hasText: '"balance": 106' }).waitFor();
      await main.locator('#a-version').fill('1');
      await main.locator('#a-state', { hasText: '"balance": 100' }).waitFor();
      await main.locator('#a-diff', { hasText: 'balance' }).waitFor();
      await main.locator('#a-event .type', { hasText: 'AccountOpened' }).waitFor();
      // by keyboard: one step right
      await main.locator('#a-version').focus();
      await main.keyboard.press('ArrowRight');
      await main.locator('#a-state', { hasText: '"balance": 101' }).waitFor();
      await main.locator('#a-diff', { hasText: '~ balance: 100 -> 101' }).waitFor();
    });

    await test('a projection broken on disk shows in the banner; mended and retried, it is live again', async () => {
      fs.writeFileSync(balancesFile, balancesText.replace('MoneyDeposited = set_balance,',
        'MoneyDeposited = function() error("broken on purpose") end,'));
      // The daemon reloads the file; the next deposit faults the projection.
      const deadline = Date.now() + WAIT;
      let faulted = false;
      while (!faulted && Date.now() < deadline) {
        await call(d, 'POST', '/commands', { aggregate: 'BankAccount', id: 'bob', type: 'Deposit', data: { amount: 1 } });
        const s = await call(d, 'GET', '/projections/account_balances');
        faulted = s.data && s.data.state === 'faulted';
        if (!faulted) await new Promise((r) => setTimeout(r, 500));
      }
      assert(faulted, 'the projection did not fault');
      await goto(main, '#/overview');
      await main.locator('#banner', { hasText: 'account_balances is faulted' }).waitFor();
      await goto(main, '#/projections');
      const row = main.locator('tr[data-name=account_balances]');
      await row.locator('.error', { hasText: 'broken on purpose' }).waitFor();
      await row.locator('.error', { hasText: /account_balances\.lua line \d+/ }).waitFor();
      await main.screenshot({ path: path.join(shots, 'projections-faulted.png') });
      fs.writeFileSync(balancesFile, balancesText);
      // Mended: wait for the reload to be taken, then retry (the page confirms first).
      await new Promise((r) => setTimeout(r, 1500));
      await row.locator('button[data-action=retry]').click();
      await row.locator('.state-live').waitFor();
      await main.locator('#banner').waitFor({ state: 'hidden' });
      // and its query answers from the page
      await main.selectOption('#q-projection', 'account_balances');
      await main.selectOption('#q-query', 'balance');
      await main.fill('#q-args', 'id=bob');
      await main.click('form.bar button[type=submit] >> text=Run');
      await main.locator('#q-result', { hasText: '"owner": "Bob"' }).waitFor();
    });

    await test('every page fits a phone-sized screen', async () => {
      await main.setViewportSize({ width: 390, height: 844 });
      for (const name of ['overview', 'streams', 'send', 'projections', 'tail']) {
        await goto(main, '#/' + name);
        const over = await main.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
        assert(over <= 1, `#/${name} is ${over}px wider than a phone screen`);
      }
      await goto(main, '#/overview');
      await main.screenshot({ path: path.join(shots, 'phone-overview.png') });
      await main.setViewportSize({ width: 1280, height: 800 });
    });

    await test('screenshots of every page', async () => {
      fs.mkdirSync(shots, { recursive: true });
      for (const hash of ['#/overview', '#/streams', '#/stream/BankAccount-web-1', '#/trace/open-web-1', '#/tail',
        '#/aggregate?type=BankAccount&id=web-1', '#/send', '#/projections']) {
        const page = hash === '#/tail' ? tail : main;
        if (page === main) await goto(main, hash);
        if (hash === '#/overview') {
          // some traffic for the charts to show (they start when the page opens)
          for (let i = 0; i < 40; i++) {
            await call(d, 'POST', '/commands', { aggregate: 'BankAccount', id: 'alice', type: i % 5 ? 'Deposit' : 'Withdraw', data: { amount: i % 5 ? 10 : 100000 } });
            await new Promise((r) => setTimeout(r, 150));
          }
        }
        await page.waitForTimeout(hash === '#/overview' ? 2500 : 800); // charts need two polls to draw
        const name = hash.slice(2).split(/[/?]/)[0];
        await page.screenshot({ path: path.join(shots, `${name}.png`) });
      }
    });

    await test('no page made an API call without the token', async () => {
      assert(untokened.length === 0, 'without the token: ' + untokened.join(', '));
      assert(pageErrors.length === 0, 'page errors: ' + pageErrors.join('; '));
    });
  } finally {
    await browser.close();
    d.child.kill('SIGTERM');
    fs.rmSync(data, { recursive: true, force: true });
    fs.rmSync(projections, { recursive: true, force: true });
  }
  const failed = results.filter((r) => !r.ok);
  process.stdout.write('\n');
  for (const f of failed) console.log(`\nFailure -> spec/browser/console_spec.mjs\n${f.name}\n${f.error && f.error.stack}`);
  console.log(`${results.length - failed.length} successes / ${failed.length} failures / 0 errors / 0 pending : ${((Date.now() - started) / 1000).toFixed(2)} seconds`);
  console.log(`screenshots: ${shots}`);
  process.exitCode = failed.length ? 1 : 0;
}

main().catch((e) => {
  console.log(`\n${e.stack}\n0 successes / 0 failures / 1 error / 0 pending : 0 seconds`);
  process.exitCode = 1;
});
