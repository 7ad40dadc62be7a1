// Drives examples/browser/index.html in Debian's headless Chromium for tests/examples.rs.
//
//   node tests/browser/example_page.mjs 'http://127.0.0.1:PORT/?url=…&job=…[&access_token=…]'
//
// Prints what the page shows as one JSON line each time it changes:
// {"connection","status","percent","label","stage","message"}, and exits 0 once the page
// says its connection is closed (the job ended or was deleted), 1 after 40 s or on a page
// error. The page's console and failed requests go to stderr, for the test's failure message.

import { chromium } from 'playwright-core';

const pageUrl = process.argv[2];
if (!pageUrl) {
  console.error('usage: node example_page.mjs PAGE_URL');
  process.exit(64);
}

const browser = await chromium.launch({
  executablePath: '/usr/bin/chromium',
  args: [
    '--no-sandbox',
    '--disable-gpu',
    '--disable-background-networking',
    '--disable-component-update',
    '--disable-sync',
    '--no-first-run',
    '--disable-quic',
  ],
});
let code = 1;
try {
  const page = await browser.newPage();
  page.on('console', (m) => console.error(`console.${m.type()}: ${m.text()}`));
  page.on('pageerror', (e) => console.error(`page error: ${e.message}`));
  page.on('requestfailed', (r) => console.error(`request failed: ${r.url()} ${r.failure()?.errorText}`));
  await page.goto(pageUrl);
  const deadline = Date.now() + 40_000;
  let last = '';
  for (;;) {
    const state = await page.evaluate(() => {
      const text = (id) => document.getElementById(id).textContent;
      const bar = document.getElementById('bar');
      return {
        connection: document.body.dataset.connection,
        status: text('status'),
        percent: bar.hasAttribute('value') ? bar.value : null,
        label: text('label'),
        stage: text('stage'),
        message: text('message'),
      };
    });
    const line = JSON.stringify(state);
    if (line !== last) {
      console.log(line);
      last = line;
    }
    if (state.connection === 'closed') {
      code = 0;
      break;
    }
    if (Date.now() > deadline) {
      console.error('example_page: the page did not finish within 40 s');
      break;
    }
    await new Promise((r) => setTimeout(r, 50));
  }
} finally {
  await browser.close();
}
process.exit(code);
