// util.js: building elements, dates, JSON display and state diffs.

// el('div.card', {attrs}, children...)
export function el(spec, attrs, ...children) {
  const [tag, ...classes] = spec.split('.');
  const e = document.createElement(tag || 'div');
  if (classes.length) e.className = classes.join(' ');
  if (attrs && (typeof attrs !== 'object' || attrs instanceof Node || Array.isArray(attrs))) {
    children.unshift(attrs);
    attrs = null;
  }
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v == null || v === false) continue;
    if (k.startsWith('on')) e.addEventListener(k.slice(2), v);
    else if (k === 'text') e.textContent = v;
    else e.setAttribute(k, v === true ? '' : v);
  }
  for (const c of children.flat(Infinity)) {
    if (c == null || c === false) continue;
    e.append(c instanceof Node ? c : String(c));
  }
  return e;
}

// A date in the user's zone, with the UTC original on hover.
export function when(iso) {
  if (!iso) return el('span.muted', '-');
  const d = new Date(iso);
  return el('time', { datetime: iso, title: iso.replace('T', ' ').replace('Z', ' UTC') }, d.toLocaleString());
}

export function pretty(v) { return JSON.stringify(v, null, 2); }

export function streamLink(stream, version) {
  const href = '#/stream/' + encodeURIComponent(stream) + (version ? '?from=' + version : '');
  return el('a', { href }, stream + (version ? ' @' + version : ''));
}

export function aggregateOf(stream) {
  const i = stream.indexOf('-');
  return i < 0 ? null : { type: stream.slice(0, i), id: stream.slice(i + 1) };
}

export function params(hash) {
  const q = hash.indexOf('?');
  return new URLSearchParams(q < 0 ? '' : hash.slice(q + 1));
}

// What changed from a to b, as lines: ["+ path: value", "- path", "~ path: old -> new"].
export function diff(a, b, path = '', out = []) {
  const isObj = (v) => v && typeof v === 'object';
  if (isObj(a) && isObj(b) && Array.isArray(a) === Array.isArray(b)) {
    const keys = new Set([...Object.keys(a), ...Object.keys(b)]);
    for (const k of [...keys].sort()) {
      const p = path ? `${path}.${k}` : k;
      if (!(k in b)) out.push({ kind: 'del', text: `- ${p}` });
      else if (!(k in a)) out.push({ kind: 'add', text: `+ ${p}: ${JSON.stringify(b[k])}` });
      else diff(a[k], b[k], p, out);
    }
  } else if (JSON.stringify(a) !== JSON.stringify(b)) {
    out.push({ kind: 'chg', text: `~ ${path || '(state)'}: ${JSON.stringify(a)} -> ${JSON.stringify(b)}` });
  }
  return out;
}

export function errorText(r) {
  const e = r.data && r.data.error;
  if (!e) return `HTTP ${r.status}: ${r.text}`;
  return `${e.code}: ${e.message}` + (e.details ? ' ' + JSON.stringify(e.details) : '');
}

// An event as a card: type, stream link, position, time, data and metadata.
export function eventCard(e, extra) {
  const meta = e.metadata || {};
  return el('article.event', { 'data-position': e.position },
    el('header',
      el('span.type', e.type),
      streamLink(e.stream, e.version),
      el('span.muted', `#${e.position}`),
      when(e.recorded_at),
      e.schema > 1 ? el('span.muted', `schema ${e.schema}`) : null,
      meta.correlation_id ? el('a', { href: '#/trace/' + encodeURIComponent(meta.correlation_id) }, 'trace') : null,
      e.upcast_error ? el('span.error', 'upcast failed: ' + e.upcast_error) : null,
      extra),
    el('details', { open: true }, el('summary', 'data'), el('pre', pretty(e.data))),
    el('details', el('summary', 'metadata'), el('pre', pretty(meta))));
}
