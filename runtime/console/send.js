// send.js: #/send: a command from the forms /modules describes, with an
// optional expected version and command id, and its answer or error.
import { api } from './api.js';
import { el, errorText, eventCard, pretty } from './util.js';
import { modules } from './aggregate.js';

export function render(main) {
  const agg = el('select', { id: 's-aggregate', name: 'aggregate' });
  const type = el('select', { id: 's-type', name: 'type' });
  const id = el('input', { id: 's-id', name: 'id', required: true });
  const expected = el('input', { id: 's-expected', name: 'expected_version', placeholder: 'any, no_stream, exists or a number' });
  const cmdId = el('input', { id: 's-command-id', name: 'command_id', placeholder: 'optional: makes a retry safe' });
  const data = el('textarea', { id: 's-data', name: 'data', spellcheck: 'false' }, '{\n}');
  const result = el('div', { id: 's-result', 'aria-live': 'polite' });
  const form = el('form', { id: 's-form' },
    el('div.bar', el('label', { for: 's-aggregate' }, 'Aggregate', agg), el('label', { for: 's-type' }, 'Command', type),
      el('label', { for: 's-id' }, 'Id', id)),
    el('label', { for: 's-data' }, 'Data (JSON)', data),
    el('div.bar', el('label', { for: 's-expected' }, 'Expected version', expected),
      el('label', { for: 's-command-id' }, 'Command id', cmdId), el('button', { type: 'submit' }, 'Send')));
  main.append(el('h1', 'Send a command'), form, result);
  let mods = [];
  const fillTypes = () => {
    const a = mods.find((m) => m.type === agg.value);
    type.replaceChildren(...(a ? a.commands : []).map((c) => el('option', { value: c }, c)));
  };
  modules().then((m) => {
    mods = m.aggregates;
    agg.replaceChildren(...mods.map((a) => el('option', { value: a.type }, a.type)));
    fillTypes();
  });
  agg.addEventListener('change', fillTypes);
  form.addEventListener('submit', async (e) => {
    e.preventDefault();
    let body;
    try { body = JSON.parse(data.value || '{}'); } catch (err) {
      result.replaceChildren(el('p.error', 'The data is not JSON: ' + err.message));
      return;
    }
    const cmd = { aggregate: agg.value, id: id.value, type: type.value, data: body };
    const ev = expected.value.trim();
    if (ev) cmd.expected_version = /^\d+$/.test(ev) ? Number(ev) : ev;
    if (cmdId.value.trim()) cmd.command_id = cmdId.value.trim();
    const r = await api('/commands', { method: 'POST', json: cmd });
    if (!r.ok) {
      result.replaceChildren(el('h2.error', `Refused (${r.status})`), el('p.error', errorText(r)), el('pre', pretty(r.data || r.text)));
      return;
    }
    const first = r.data.events && r.data.events[0];
    result.replaceChildren(el('h2.ok', `Done: ${r.data.stream} at version ${r.data.version}`),
      first && first.metadata && first.metadata.correlation_id
        ? el('p', el('a', { href: '#/trace/' + encodeURIComponent(first.metadata.correlation_id), id: 's-trace' }, 'Trace this command')) : null,
      ...(r.data.events || []).map((x) => eventCard(x)));
  });
}
