// charts.js: small line charts drawn as SVG (no library): a rolling window
// of samples per series, redrawn on each push.
import { el } from './util.js';

const NS = 'http://www.w3.org/2000/svg';
const COLORS = ['#1f5fbf', '#b3261e', '#1e7b34', '#8a5a00', '#6b3fa0', '#00838f', '#c2185b'];

export class Chart {
  constructor(title, { unit = '', window = 300, digits = 1 } = {}) {
    this.unit = unit;
    this.window = window; // seconds shown
    this.digits = digits;
    this.series = new Map(); // name -> [{t, v}]
    this.svg = document.createElementNS(NS, 'svg');
    this.svg.setAttribute('viewBox', '0 0 300 120');
    this.svg.setAttribute('preserveAspectRatio', 'none');
    this.svg.setAttribute('role', 'img');
    this.svg.setAttribute('aria-label', title);
    this.now = el('span.big', '-');
    this.legend = el('div.legend');
    this.node = el('section.card.chart', { 'aria-label': title }, el('h2', title), this.now, this.svg, this.legend);
  }

  push(t, values) {
    for (const [name, v] of Object.entries(values)) {
      if (!this.series.has(name)) this.series.set(name, []);
      const s = this.series.get(name);
      s.push({ t, v });
      while (s.length && s[0].t < t - this.window * 1000) s.shift(); // bounded
    }
    this.draw(t);
  }

  draw(t) {
    const all = [...this.series.values()].flat();
    const max = Math.max(1e-9, ...all.map((p) => p.v));
    const t0 = t - this.window * 1000;
    this.svg.replaceChildren();
    // the baseline, and the scale: the top of the chart is the window's maximum
    const base = document.createElementNS(NS, 'line');
    for (const [k, v] of Object.entries({ x1: 0, x2: 300, y1: 115.5, y2: 115.5, stroke: '#d6dbe0' })) base.setAttribute(k, v);
    const top = document.createElementNS(NS, 'text');
    for (const [k, v] of Object.entries({ x: 2, y: 9, 'font-size': 9, fill: '#5c6670' })) top.setAttribute(k, v);
    top.textContent = all.length ? `max ${Number(max).toFixed(this.digits)}${this.unit}, last ${Math.round(this.window / 60)} min` : '';
    this.svg.append(base, top);
    const names = [...this.series.keys()];
    names.forEach((name, i) => {
      const pts = this.series.get(name)
        .map((p) => `${((p.t - t0) / (this.window * 1000)) * 300},${115 - (p.v / max) * 105}`).join(' ');
      const line = document.createElementNS(NS, 'polyline');
      line.setAttribute('points', pts);
      line.setAttribute('fill', 'none');
      line.setAttribute('stroke', COLORS[i % COLORS.length]);
      line.setAttribute('stroke-width', '1.5');
      line.setAttribute('vector-effect', 'non-scaling-stroke');
      this.svg.append(line);
    });
    const fmt = (v) => (v == null ? '-' : Number(v).toFixed(this.digits)) + this.unit;
    const last = (n) => { const s = this.series.get(n); return s.length ? s[s.length - 1].v : null; };
    this.now.textContent = names.length === 1 ? fmt(last(names[0])) : '';
    this.legend.replaceChildren(...names.map((n, i) => {
      const s = el('span', `${n} ${fmt(last(n))}`);
      s.style.setProperty('--c', COLORS[i % COLORS.length]);
      return s;
    }));
  }
}
