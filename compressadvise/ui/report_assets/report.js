/* compressadvise report: draws the charts (Vega, inlined) and makes the layer table sortable,
   filterable and searchable. No network: every input is in this page. */
(function () {
  'use strict';
  var table, rows, count, query, typeSel, changedOnly;

  function cellValue(row, index, numeric) {
    var cell = row.cells[index];
    if (!numeric) return cell.textContent.toLowerCase();
    var v = cell.getAttribute('data-v');
    return v === '' || v === null ? null : parseFloat(v);
  }

  function layerName(row) { return row.cells[1].textContent; }
  function layerType(row) { return row.cells[2].textContent; }

  function sortBy(th) {
    var index = Array.prototype.indexOf.call(th.parentNode.children, th);
    var numeric = th.getAttribute('data-type') === 'num';
    var asc = th.getAttribute('aria-sort') === 'descending' ||
              (th.getAttribute('aria-sort') === 'none' && !numeric);
    Array.prototype.forEach.call(th.parentNode.children, function (h) { h.setAttribute('aria-sort', 'none'); });
    th.setAttribute('aria-sort', asc ? 'ascending' : 'descending');
    var keyed = rows.map(function (r, i) { return [cellValue(r, index, numeric), i, r]; });
    keyed.sort(function (a, b) {
      if (a[0] === null && b[0] === null) return a[1] - b[1];
      if (a[0] === null) return 1;   // missing values last, whatever the direction
      if (b[0] === null) return -1;
      var c = a[0] < b[0] ? -1 : a[0] > b[0] ? 1 : a[1] - b[1];
      return asc ? c : -c;
    });
    var body = table.tBodies[0];
    var frag = document.createDocumentFragment();
    keyed.forEach(function (k) { frag.appendChild(k[2]); });
    body.appendChild(frag);
    rows = keyed.map(function (k) { return k[2]; });
  }

  function applyFilters() {
    var q = query.value.trim().toLowerCase();
    var t = typeSel.value;
    var onlyChanged = changedOnly.checked;
    var shown = 0;
    rows.forEach(function (r) {
      var text = (layerName(r) + ' ' + r.querySelector('td.setting').textContent).toLowerCase();
      var ok = (!q || text.indexOf(q) >= 0) && (!t || layerType(r) === t) &&
               (!onlyChanged || r.getAttribute('data-changed') === '1');
      r.classList.toggle('hidden', !ok);
      if (ok) shown++;
    });
    count.textContent = shown + ' of ' + rows.length + ' layers';
  }

  function selectLayer(name) {
    query.value = name;
    applyFilters();
    rows.forEach(function (r) { r.classList.toggle('selected', layerName(r) === name); });
    document.getElementById('layers-section').scrollIntoView({behavior: 'smooth'});
  }

  function initTable() {
    table = document.getElementById('layers');
    if (!table) return;
    rows = Array.prototype.slice.call(table.tBodies[0].rows);
    count = document.getElementById('count');
    query = document.getElementById('q');
    typeSel = document.getElementById('type-filter');
    changedOnly = document.getElementById('changed-only');
    Array.prototype.forEach.call(table.tHead.rows[0].cells, function (th) {
      th.addEventListener('click', function () { sortBy(th); });
      th.addEventListener('keydown', function (e) { if (e.key === 'Enter' || e.key === ' ') { e.preventDefault(); sortBy(th); } });
    });
    query.addEventListener('input', applyFilters);
    typeSel.addEventListener('change', applyFilters);
    changedOnly.addEventListener('change', applyFilters);
    window.compressadviseReport = {sortBy: sortBy, applyFilters: applyFilters, selectLayer: selectLayer};
  }

  function loadRuntime() {
    // The Vega runtime ships inert (type=text/plain) so that it does not hold up the page.
    var src = document.getElementById('vega-runtime');
    if (!src || typeof vegaEmbed === 'function') return;
    var s = document.createElement('script');
    s.textContent = src.textContent;
    document.head.appendChild(s);
  }

  function renderCharts() {
    loadRuntime();
    var holder = document.getElementById('chart-specs');
    var specs = holder ? JSON.parse(holder.textContent) : {};
    var boxes = document.querySelectorAll('[data-chart]');
    Array.prototype.forEach.call(boxes, function (el) {
      var fail = function (e) { el.setAttribute('data-rendered', 'error'); el.textContent = 'chart failed: ' + e; };
      if (typeof vegaEmbed !== 'function') { fail('the inlined Vega runtime is missing'); return; }
      // Precompiled Vega specs; actions off: the export menu would link to online editors.
      vegaEmbed(el, specs[el.getAttribute('data-chart')], {mode: 'vega', renderer: 'svg', actions: false})
        .then(function (result) {
          result.view.addEventListener('click', function (event, item) {
            var d = item && item.datum;
            if (d && typeof d.layer === 'string' && d.layer.charAt(0) !== '(') selectLayer(d.layer);
          });
          el.setAttribute('data-rendered', '1');
        }, fail);
    });
  }

  document.addEventListener('DOMContentLoaded', function () {
    initTable();
    // Charts after the first paint: the table is usable at once, even on a 1,000-layer model.
    setTimeout(function () {
      renderCharts();
      // The table skipped layout while the page loaded (content-visibility: auto); lay it out
      // now so full-page screenshots and printouts include it.
      var wrap = document.querySelector('.tablewrap');
      if (wrap) setTimeout(function () { wrap.style.contentVisibility = 'visible'; }, 0);
    }, 0);
  });
})();
