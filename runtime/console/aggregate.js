// aggregate.js: #/aggregate?type=&id=: an instance's state with time travel:
// a version slider (?version=) and a time picker (?at=). Each step shows the
// event that made it and what it changed in the state.
import { api } from './api.js';
import { diff, el, errorText, eventCard, params, pretty } from './util.js';

let modulesCache = null;
export async function modules() {
  if (!modulesCache) {
    const r = await api('/modules');
    modulesCache = r.ok ? r.data : { aggregates: [], projections: [] };
    setTimeout(() => { modulesCache = null; }, 10000);
  }
  return modulesCache;
}

export function render(main, hash) {
  const p = params(hash);
  const type = el('select', { id: 'a-type', name: 'type' });
  const id = el('input', { id: 'a-id', name: 'id', value: p.get('id') || '', required: true });
  const form = el('form.bar', el('label', { for: 'a-type' }, 'Aggregate', type), el('label', { for: 'a-id' }, 'Id', id),
    el('button', { type: 'submit' }, 'Show'));
  const out = el('div');
  main.append(el('h1', 'Aggregate'), form, out);
  modules().then((m) => {
    type.replaceChildren(...m.aggregates.map((a) => el('option', { value: a.type, selected: a.type === p.get('type') }, a.type)));
    if (p.get('type') && p.get('id')) show(out, p.get('type'), p.get('id'));
  });
  form.addEventListener('submit', (e) => {
    e.preventDefault();
    location.hash = `#/aggregate?type=${encodeURIComponent(type.value)}&id=${encodeURIComponent(id.value)}`;
  });
}

async function show(out, type, id) {
  const base = `/aggregates/${encodeURIComponent(type)}/${encodeURIComponent(id)}`;
  const cur = await api(base);
  if (!cur.ok) { out.replaceChildren(el('p.error', errorText(cur))); return; }
  const top = cur.data.version;
  const slider = el('input', { type: 'range', id: 'a-version', min: 0, max: top, value: top, step: 1, 'aria-valuetext': `version ${top}` });
  const at = el('input', { type: 'datetime-local', id: 'a-at', step: '0.001' });
  const label = el('span', { id: 'a-label', 'aria-live': 'polite' });
  const state = el('pre', { id: 'a-state' });
  const changes = el('div.diff', { id: 'a-diff' });
  const event = el('div', { id: 'a-event' });
  out.replaceChildren(
    el('p', 'Stream ', el('a', { href: '#/stream/' + encodeURIComponent(cur.data.stream) }, cur.data.stream),
      ` at version ${top}`, cur.data.deleted ? el('span.error', ' (deleted)') : null),
    el('div.bar', el('label', { for: 'a-version' }, 'Version', slider), label),
    el('form.bar', { id: 'a-at-form' }, el('label', { for: 'a-at' }, 'State at a time (your zone)', at),
      el('button.secondary', { type: 'submit' }, 'Go')),
    el('div.two', el('section.card', el('h2', 'State'), state),
      el('section.card', el('h2', 'What this step changed'), changes, event)));
  let seq = 0;
  async function step(query, describe) {
    const mine = ++seq;
    const r = await api(`${base}?${query}`);
    if (mine !== seq) return; // a later move of the slider won
    if (!r.ok) { state.textContent = errorText(r); return; }
    const v = r.data.version;
    slider.value = v;
    slider.setAttribute('aria-valuetext', `version ${v}`);
    label.textContent = `${describe || ''}version ${v} of ${top}`;
    state.textContent = pretty(r.data.state);
    if (v === 0) { changes.replaceChildren(el('p.muted', 'The initial state: no event yet.')); event.replaceChildren(); return; }
    const [before, ev] = await Promise.all([
      api(`${base}?version=${v - 1}`),
      api(`/streams/${encodeURIComponent(r.data.stream)}?from=${v}&limit=1`),
    ]);
    if (mine !== seq) return;
    const lines = before.ok ? diff(before.data.state, r.data.state) : [];
    changes.replaceChildren(...(lines.length ? lines.map((l) => el('div.' + l.kind, l.text)) : [el('p.muted', 'No change to the state.')]));
    event.replaceChildren(...(ev.ok && ev.data.events[0] ? [eventCard(ev.data.events[0])] : []));
  }
  slider.addEventListener('change', () => step(`version=${slider.value}`));
  slider.addEventListener('input', () => { label.textContent = `version ${slider.value} of ${top}`; });
  out.querySelector('#a-at-form').addEventListener('submit', (e) => {
    e.preventDefault();
    if (!at.value) return;
    const iso = new Date(at.value).toISOString();
    step(`at=${encodeURIComponent(iso)}`, `at ${iso}: `);
  });
  step(`version=${top}`);
}
