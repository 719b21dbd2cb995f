// report.html's only script: filters, search and sorting over data attributes (no HTML is built
// from strings here, so nothing a model wrote can become markup).
"use strict";

// A filterable section holds a search box, optional <select class="principle">, a counter and
// items with data-principles='["id", ...]'.
function setupFilter(section) {
  const items = Array.from(section.querySelectorAll(".item"));
  const text = new Map(items.map((it) => [it, it.textContent.toLowerCase()]));
  const search = section.querySelector("input.search");
  const select = section.querySelector("select.principle");
  const counter = section.querySelector(".count");
  function apply() {
    const q = search ? search.value.trim().toLowerCase() : "";
    const p = select ? select.value : "";
    let shown = 0;
    for (const it of items) {
      const principles = JSON.parse(it.dataset.principles || "[]");
      const ok = (!q || text.get(it).includes(q)) && (!p || principles.includes(p));
      it.hidden = !ok;
      shown += ok;
    }
    if (counter) counter.textContent = `${shown} of ${items.length} shown`;
  }
  if (search) search.addEventListener("input", apply);
  if (select) select.addEventListener("change", apply);
  apply();
}

// Clicking a <th data-sort> sorts the table body by that column's data-value (numbers; NaN last).
function setupSort(table) {
  const body = table.tBodies[0];
  table.querySelectorAll("th[data-sort]").forEach((th) => {
    th.addEventListener("click", () => {
      const desc = th.dataset.dir !== "desc";
      table.querySelectorAll("th[data-sort]").forEach((h) => delete h.dataset.dir);
      th.dataset.dir = desc ? "desc" : "asc";
      const key = th.dataset.sort;
      const value = (tr) => {
        const v = parseFloat(tr.dataset[key]);
        return Number.isNaN(v) ? (desc ? -Infinity : Infinity) : v;
      };
      const rows = Array.from(body.rows);
      rows.sort((a, b) => (desc ? value(b) - value(a) : value(a) - value(b)));
      rows.forEach((r) => body.appendChild(r));
    });
  });
}

document.querySelectorAll("section.filterable").forEach(setupFilter);
document.querySelectorAll("table.sortable").forEach(setupSort);
