"""The review page's inline CSS and JavaScript (kept apart from the HTML builder; no network, no libraries).

The script: sorts on a header click (`#sort=<column>[:desc]` sorts on load), filters on typed text, opens any
chart or neighbour full size in a lightbox (with the chart's read-trace overlay a toggle away), swaps every
chart for its overlay at once, keeps each chart's agree / disagree / comment in localStorage (keyed by the job
key and the chart id, so it survives a reload while offline) and exports them as a CSV (`cli.py review-import`
stores it with the job). Decisions the store already holds come in the page (`data-verdict`...): the newer of
those and the browser's wins. Text from the page reaches the lightbox by cloning nodes, never as markup.
After load it marks each chart/neighbour <img> `data-loaded="1"` once decoded, so a headless browser can check.
"""

CSS = """
:root{--ink:#1f2933;--muted:#616e7c;--line:#d9e2ec;--done:#1f7a4d;--error:#b42318;--pending:#8a6d00;--bar:#3e7cb1;
--unparsed:#8e3b8c}
*{box-sizing:border-box}body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:var(--ink);
margin:0;padding:20px 28px;background:#fbfcfd}h1{font-size:22px;margin:0 0 4px}h2{font-size:16px;margin:0 0 8px}
.meta{color:var(--muted);font-size:12px;margin-bottom:14px;word-break:break-all}.notice{color:var(--muted);font-size:12px}
.summary{display:flex;flex-wrap:wrap;gap:18px;margin:12px 0 18px}.card{background:#fff;border:1px solid var(--line);
border-radius:8px;padding:12px 14px}.counts{display:flex;gap:14px}.count b{display:block;font-size:24px}
.count.done b{color:var(--done)}.count.error b{color:var(--error)}.count.pending b{color:var(--pending)}
.count.unparsed b{color:var(--unparsed)}.badge.unparsed{background:var(--unparsed)}.dropped{color:var(--error)}
pre.raw{white-space:pre-wrap;word-break:break-word;max-height:16em;overflow:auto;font-size:12px;margin:4px 0}
svg text{font:11px system-ui,sans-serif;fill:var(--ink)}.tools{margin:8px 0;display:flex;gap:14px;align-items:center;
flex-wrap:wrap}.tools input[type=search]{padding:5px 8px;width:280px;border:1px solid var(--line);border-radius:6px}
button{font:inherit;padding:3px 10px;border:1px solid #9aa5b1;border-radius:6px;background:#fff;cursor:pointer}
table{border-collapse:collapse;width:100%;background:#fff}
th,td{border-bottom:1px solid var(--line);padding:6px 8px;vertical-align:top;text-align:left}
th{position:sticky;top:0;background:#f0f4f8;cursor:pointer;user-select:none;white-space:nowrap;z-index:1}
th[aria-sort=ascending]::after{content:" \\25B2"}th[aria-sort=descending]::after{content:" \\25BC"}
td.chart img{width:240px;border:1px solid var(--line);display:block}img.zoom{cursor:zoom-in}
.key{font-size:12px;color:var(--muted);word-break:break-all;max-width:240px}.badge{border-radius:10px;padding:1px 8px;
font-size:12px;color:#fff}.refused{color:var(--error);font-size:12px;max-width:240px;word-break:break-word}
.badge.done{background:var(--done)}.badge.error{background:var(--error)}.badge.pending{background:var(--pending)}
.err{color:var(--error);max-width:380px;word-break:break-word}.nb{display:flex;flex-wrap:wrap;gap:8px;min-width:548px;
max-width:560px}.nb figure{margin:0;width:130px}.nb img{width:130px;border:1px solid var(--line);display:block}
.nb figcaption{font-size:11px;color:var(--muted)}.nb .en{margin:2px 0;padding-left:14px;color:var(--ink)}
.nothumb{width:130px;height:70px;border:1px dashed var(--line);color:var(--muted);font-size:11px;display:flex;
align-items:center;justify-content:center;text-align:center}td.chart .nothumb{width:240px;height:48px}
blockquote.orig{margin:2px 0;padding-left:6px;border-left:3px solid var(--line);font-style:italic;color:var(--ink)}
ul.dx{margin:0;padding-left:16px}details summary{cursor:pointer}.ovl{font-size:12px;color:var(--muted)}
.report{min-width:260px;max-width:420px}.measured{min-width:190px;max-width:260px;font-size:13px}
.urgent{background:var(--error);color:#fff;font-weight:700;border-radius:4px;padding:2px 6px;display:inline-block;
margin-bottom:4px}.card.urgent{display:block;border-color:var(--error);font-size:15px}.mx{color:var(--muted)}
.truth{min-width:130px}.truth .ok{color:var(--done)}.truth .miss,.truth .extra{color:var(--error);font-weight:600}
tr.mismatch td.truth{background:#fdecea}.verdict{min-width:170px}.verdict textarea{width:100%;font:inherit;
font-size:12px}.verdict label{margin-right:6px;white-space:nowrap}tr[data-mark=agree] td.verdict{background:#e8f5ee}
tr[data-mark=disagree] td.verdict{background:#fdecea}.vstate{font-size:11px;color:var(--muted)}
#lightbox{position:fixed;inset:0;background:rgba(15,23,31,.88);z-index:10;display:flex;flex-direction:column;
padding:12px}#lightbox[hidden]{display:none}.lb-bar{display:flex;gap:10px;align-items:center;color:#fff;
margin-bottom:8px}.lb-bar span{flex:1;word-break:break-all}.lb-body{flex:1;overflow:auto;display:flex;gap:14px;
align-items:flex-start}#lb-img{max-width:100%;background:#fff}#lb-info{color:#fff;max-width:360px;font-size:13px}
#lb-info blockquote.orig{color:#fff}#lb-info .en{color:#fff}
"""

JS = """
(function(){
  var table=document.getElementById('results'), body=table.tBodies[0];
  var jobKey=table.getAttribute('data-job-key'), jobId=table.getAttribute('data-job-id');
  function each(list,f){Array.prototype.forEach.call(list,f);}
  function val(tr,i,type){var td=tr.cells[i], v=td.getAttribute('data-sort'); if(v===null){v=td.textContent.trim();}
    if(type==='num'){var n=parseFloat(v); return isNaN(n)?-Infinity:n;} return v.toLowerCase();}
  function sortBy(i,desc){
    var th=table.tHead.rows[0].cells[i], type=th.getAttribute('data-type');
    var rows=Array.prototype.slice.call(body.rows);
    rows.sort(function(a,b){var x=val(a,i,type), y=val(b,i,type); var c=x<y?-1:(x>y?1:0);
      if(c===0){c=(+a.getAttribute('data-id'))-(+b.getAttribute('data-id'));} return desc?-c:c;});
    rows.forEach(function(r){body.appendChild(r);});
    each(table.tHead.rows[0].cells,function(h){h.removeAttribute('aria-sort');});
    th.setAttribute('aria-sort',desc?'descending':'ascending');
    table.setAttribute('data-sorted',th.getAttribute('data-key')+(desc?':desc':''));
  }
  each(table.tHead.rows[0].cells,function(th,i){
    th.addEventListener('click',function(){sortBy(i,th.getAttribute('aria-sort')==='ascending');});});
  var m=/(?:^#|&)sort=([a-z]+)(:desc)?/.exec(location.hash||'');
  if(m){each(table.tHead.rows[0].cells,function(th,i){if(th.getAttribute('data-key')===m[1]){sortBy(i,!!m[2]);}});}
  var filter=document.getElementById('filter');
  filter.addEventListener('input',function(){var q=filter.value.toLowerCase();
    each(body.rows,function(r){r.style.display=r.textContent.toLowerCase().indexOf(q)<0?'none':'';});});

  /* overlays: a chart's picture or its read traces */
  function showOverlay(img,on){var o=img.getAttribute('data-overlay'); if(!o){return;}
    if(!img.hasAttribute('data-thumb')){img.setAttribute('data-thumb',img.getAttribute('src'));}
    img.setAttribute('src',on?o:img.getAttribute('data-thumb')); img.setAttribute('data-showing',on?'overlay':'picture');}
  each(document.querySelectorAll('input.overlay-toggle'),function(box){box.addEventListener('change',function(){
    showOverlay(box.closest('td').querySelector('img.zoom'),box.checked);});});
  var all=document.getElementById('overlay-all');
  if(all){all.addEventListener('change',function(){each(document.querySelectorAll('input.overlay-toggle'),function(b){
    b.checked=all.checked; showOverlay(b.closest('td').querySelector('img.zoom'),all.checked);});});}

  /* lightbox */
  var lb=document.getElementById('lightbox'), lbImg=null,
      lbTitle=document.getElementById('lb-title'), lbInfo=document.getElementById('lb-info'),
      lbOver=document.getElementById('lb-overlay'), current=null;
  function lbShow(over){var o=current.getAttribute('data-overlay');
    if(!lbImg){lbImg=document.createElement('img'); lbImg.id='lb-img'; lbImg.alt='';
      lb.querySelector('.lb-body').insertBefore(lbImg,lbInfo);}
    lbImg.alt=lbTitle.textContent;
    lbImg.setAttribute('src',over&&o?o:(current.getAttribute('data-full')||current.getAttribute('src')));
    lb.setAttribute('data-showing',over&&o?'overlay':'picture');
    lbOver.textContent=over?'Show the picture':'Show the read traces';}
  function openLb(img){current=img; lbTitle.textContent=img.getAttribute('data-title')||img.getAttribute('alt')||'';
    while(lbInfo.firstChild){lbInfo.removeChild(lbInfo.firstChild);}
    var fig=img.closest('figure'), info=fig&&fig.querySelector('.info');
    if(info){var c=info.cloneNode(true); each(c.querySelectorAll('details'),function(d){d.open=true;}); lbInfo.appendChild(c);}
    lbOver.hidden=!img.getAttribute('data-overlay');
    lbShow(img.getAttribute('data-showing')==='overlay'); lb.hidden=false; lb.setAttribute('data-open','1');}
  function closeLb(){lb.hidden=true; lb.removeAttribute('data-open'); if(lbImg){lbImg.remove(); lbImg=null;} current=null;}
  each(document.querySelectorAll('img.zoom'),function(img){img.addEventListener('click',function(){openLb(img);});});
  lbOver.addEventListener('click',function(){lbShow(lb.getAttribute('data-showing')!=='overlay');});
  document.getElementById('lb-close').addEventListener('click',closeLb);
  lb.addEventListener('click',function(e){if(e.target===lb||e.target.classList.contains('lb-body')){closeLb();}});
  document.addEventListener('keydown',function(e){if(e.key==='Escape'&&!lb.hidden){closeLb();}});

  /* verdicts: localStorage while offline, the store's (imported) ones in the page; the newer wins */
  function storeKey(id){return 'rag-ecg-verdict:'+jobKey+':'+id;}
  function load(id){try{return JSON.parse(localStorage.getItem(storeKey(id))||'null');}catch(e){return null;}}
  function save(id,v){try{localStorage.setItem(storeKey(id),JSON.stringify(v));}catch(e){}}
  function state(tr){var td=tr.querySelector('td.verdict'), r=td.querySelector('input[type=radio]:checked');
    return {verdict:r?r.value:'', comment:td.querySelector('textarea').value,
            decided_at:tr.getAttribute('data-decided')||''};}
  function paint(tr,v,where){var td=tr.querySelector('td.verdict');
    each(td.querySelectorAll('input[type=radio]'),function(r){r.checked=(r.value===v.verdict);});
    td.querySelector('textarea').value=v.comment||''; tr.setAttribute('data-decided',v.decided_at||'');
    tr.setAttribute('data-mark',v.verdict||''); td.setAttribute('data-sort',(v.verdict||'')+(v.comment?' comment':''));
    td.querySelector('.vstate').textContent=v.verdict||v.comment?(where+(v.decided_at?' '+v.decided_at.slice(0,16).replace('T',' '):'')):'';
    tally();}
  function changed(tr){var v=state(tr); v.decided_at=new Date().toISOString(); paint(tr,v,'saved in this browser');
    save(tr.getAttribute('data-id'),v);}
  function tally(){var a=0,d=0,c=0; each(body.rows,function(tr){var k=tr.getAttribute('data-mark');
      a+=k==='agree'; d+=k==='disagree'; c+=!!tr.querySelector('td.verdict textarea').value;});
    var t=document.getElementById('verdict-tally'); if(t){t.textContent=a+' agree · '+d+' disagree · '+c+' comment(s)';}}
  each(body.rows,function(tr){var id=tr.getAttribute('data-id'), td=tr.querySelector('td.verdict');
    var stored={verdict:tr.getAttribute('data-verdict')||'', comment:tr.getAttribute('data-comment')||'',
                decided_at:tr.getAttribute('data-stored-at')||''};
    var local=load(id), pick=stored, where='imported';
    if(local&&(!stored.decided_at&&!stored.verdict&&!stored.comment||(local.decided_at||'')>=(stored.decided_at||''))){
      pick=local; where='saved in this browser';}
    paint(tr,pick,where);
    each(td.querySelectorAll('input[type=radio]'),function(r){r.addEventListener('change',function(){changed(tr);});});
    td.querySelector('textarea').addEventListener('change',function(){changed(tr);});
    td.querySelector('button.vclear').addEventListener('click',function(){
      each(td.querySelectorAll('input[type=radio]'),function(r){r.checked=false;}); changed(tr);});});
  function cell(s){s=String(s==null?'':s); if(/^[=+\\-@\\t\\r]/.test(s)){s="'"+s;} return '"'+s.replace(/"/g,'""')+'"';}
  window.ragEcgVerdictCsv=function(){
    var lines=['job_key,job_id,chart_id,chart,verdict,comment,decided_at'];
    var rows=Array.prototype.slice.call(body.rows).sort(function(a,b){return a.getAttribute('data-id')-b.getAttribute('data-id');});
    rows.forEach(function(tr){var v=state(tr); if(!v.verdict&&!v.comment){return;}
      lines.push([jobKey,jobId,tr.getAttribute('data-id'),tr.getAttribute('data-chart'),v.verdict,v.comment,
                  v.decided_at].map(cell).join(','));});
    return lines.join('\\r\\n')+'\\r\\n';};
  document.getElementById('export-verdicts').addEventListener('click',function(){
    var blob=new Blob([window.ragEcgVerdictCsv()],{type:'text/csv;charset=utf-8'}), a=document.createElement('a');
    a.href=URL.createObjectURL(blob); a.download='verdicts-job'+jobId+'-'+jobKey.slice(0,12)+'.csv';
    document.body.appendChild(a); a.click(); setTimeout(function(){URL.revokeObjectURL(a.href); a.remove();},1000);});

  function mark(){var ok=0, imgs=document.querySelectorAll('img.zoom');
    each(imgs,function(img){var good=img.complete&&img.naturalWidth>0; img.setAttribute('data-loaded',good?'1':'0');
      if(good){ok++;}});
    document.body.setAttribute('data-images',imgs.length);
    document.body.setAttribute('data-images-loaded',ok); document.body.setAttribute('data-ready','1');}
  if(document.readyState==='complete'){mark();}else{window.addEventListener('load',mark);}
})();
"""
