// overview.js: the head position and live charts from /metrics, polled every
// two seconds; rates are the difference between two polls.
import { api, every } from './api.js';
import { Chart } from './charts.js';
import { el } from './util.js';

// Prometheus text -> [{name, labels, value}]
export function parseMetrics(text) {
  const out = [];
  for (const line of text.split('\n')) {
    if (!line || line[0] === '#') continue;
    const m = line.match(/^([a-zA-Z_:][\w:]*)(?:\{(.*)\})?\s+(\S+)/);
    if (!m) continue;
    const labels = {};
    for (const l of (m[2] || '').matchAll(/(\w+)="((?:[^"\\]|\\.)*)"/g)) labels[l[1]] = l[2];
    out.push({ name: m[1], labels, value: Number(m[3]) });
  }
  return out;
}

const sum = (ms, name, pred = () => true) =>
  ms.filter((m) => m.name === name && pred(m.labels)).reduce((a, m) => a + m.value, 0);

// The q-quantile of the histogram difference between two polls (seconds).
function quantile(prev, cur, name, q) {
  const b = (ms) => ms.filter((m) => m.name === name + '_bucket')
    .map((m) => ({ le: m.labels.le === '+Inf' ? Infinity : Number(m.labels.le), v: m.value }))
    .sort((x, y) => x.le - y.le);
  const a = b(prev), c = b(cur);
  const d = c.map((x, i) => ({ le: x.le, v: x.v - (a[i] ? a[i].v : 0) }));
  const total = d.length ? d[d.length - 1].v : 0;
  if (total <= 0) return null;
  const rank = q * total;
  let lower = 0, prevCount = 0;
  for (const x of d) {
    if (x.v >= rank) {
      if (x.le === Infinity) return lower;
      const inBucket = x.v - prevCount;
      return lower + (x.le - lower) * (inBucket > 0 ? (rank - prevCount) / inBucket : 1);
    }
    lower = x.le;
    prevCount = x.v;
  }
  return lower;
}

export function render(main) {
  const head = el('span.big', '-');
  const health = el('span.muted');
  const charts = {
    commands: new Chart('Commands/s'),
    errors: new Chart('Errors/s by code'),
    latency: new Chart('Commit latency (ms)', { digits: 2 }),
    fsyncs: new Chart('fsyncs/s'),
    batch: new Chart('Commit batch size (events)'),
    cache: new Chart('Aggregate cache hit rate', { unit: '%' }),
    subscribers: new Chart('Subscribers', { digits: 0 }),
    lag: new Chart('Projection lag (events)', { digits: 0 }),
  };
  main.append(
    el('h1', 'Overview'),
    el('div.grid',
      el('section.card', { 'aria-label': 'Head' }, el('h2', 'Head position'), head, el('div', health)),
      Object.values(charts).map((c) => c.node)));
  let prev = null, prevT = 0;
  return every(2000, async () => {
    const [m, h] = await Promise.all([api('/metrics'), api('/health')]);
    if (h.data) {
      head.textContent = h.data.position;
      health.textContent = `${h.data.status}, up ${Math.round(h.data.uptime_ms / 1000)} s, ${h.data.in_flight} commands in flight`;
    }
    if (!m.ok) return;
    const cur = parseMetrics(m.text);
    const t = Date.now();
    charts.subscribers.push(t, { subscribers: sum(cur, 'ebb_subscribers') });
    const lag = {};
    for (const x of cur.filter((x) => x.name === 'ebb_projection_lag_events')) lag[x.labels.projection] = x.value;
    charts.lag.push(t, lag);
    if (prev) {
      const dt = (t - prevT) / 1000;
      const rate = (name, pred) => Math.max(0, (sum(cur, name, pred) - sum(prev, name, pred)) / dt);
      charts.commands.push(t, { 'commands/s': rate('ebb_commands_total') });
      const errs = {};
      for (const x of cur.filter((x) => x.name === 'ebb_commands_total' && x.labels.result !== 'ok'))
        errs[x.labels.result] = rate('ebb_commands_total', (l) => l.result === x.labels.result);
      charts.errors.push(t, errs);
      const p50 = quantile(prev, cur, 'ebb_commit_seconds', 0.5);
      const p99 = quantile(prev, cur, 'ebb_commit_seconds', 0.99);
      charts.latency.push(t, { p50: p50 == null ? 0 : p50 * 1000, p99: p99 == null ? 0 : p99 * 1000 });
      charts.fsyncs.push(t, { 'fsyncs/s': rate('ebb_fsync_total') });
      const dc = sum(cur, 'ebb_commit_batch_size_count') - sum(prev, 'ebb_commit_batch_size_count');
      const ds = sum(cur, 'ebb_commit_batch_size_sum') - sum(prev, 'ebb_commit_batch_size_sum');
      charts.batch.push(t, { 'events per commit': dc > 0 ? ds / dc : 0 });
      const hits = rate('ebb_aggregate_cache_hits_total'), misses = rate('ebb_aggregate_cache_misses_total');
      const all = sum(cur, 'ebb_aggregate_cache_hits_total') + sum(cur, 'ebb_aggregate_cache_misses_total');
      const rateNow = hits + misses > 0 ? hits / (hits + misses) : all > 0 ? sum(cur, 'ebb_aggregate_cache_hits_total') / all : 0;
      charts.cache.push(t, { 'hit rate': 100 * rateNow });
    }
    prev = cur;
    prevT = t;
  });
}
