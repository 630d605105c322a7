{#- Which Dovecot packages apt installs (chatmail:dovecot:packages), set up before the one
    package transaction (chatmail.packages), so a new relay installs the chosen ones at once:
      debian    Debian's own, pinned over any other origin (a relay that ran another
                build returns to Debian's at the next apply);
      patched   our build of Debian's source (packaging/dovecot, scripts/build-dovecot): a flat
                apt repository copied from the master, pinned over Debian's;
      upstream  chatmail's published .debs, downloaded and checked by sha256, pinned alike.
    The pin has priority 1001: apt installs the chosen version even where it is older than
    what another origin offers, and never upgrades away from it. (Our versions are pinned by
    a regular expression: Debian 13's apt 3.0 did not match the glob "*+chatmail*" to
    them, where Debian 12's apt 2.6 did.) #}
{%- from "chatmail/map.jinja" import chatmail with context %}
{%- set d = chatmail.dovecot %}
{%- set packages = chatmail.pkgs.dovecot %}
{%- set list_file = "/etc/apt/sources.list.d/chatmail-dovecot.list" %}
{%- set pins = {
      "debian": "release o=" ~ d.distribution_origin,
      "patched": "version /[+]chatmail[0-9]+$/",
      "upstream": "version " ~ d.upstream.version,
    } %}

{%- if d.packages == "patched" %}

chatmail-dovecot-packages-repo:
  file.recurse:
    - name: {{ d.patched_dir }}
    - source: {{ d.patched_source }}/{{ d.codename }}
    - clean: True
    - file_mode: "0644"
    - dir_mode: "0755"

chatmail-dovecot-packages-list:
  file.managed:
    - name: {{ list_file }}
    # trusted: the files came from the master like the formula itself
    - contents: "deb [trusted=yes] file:{{ d.patched_dir }} ./"
    - require:
      - file: chatmail-dovecot-packages-repo
{%- else %}

chatmail-dovecot-packages-list:
  file.absent:
    - name: {{ list_file }}
{%- endif %}

chatmail-dovecot-packages-pin:
  file.managed:
    - name: {{ d.pin_file }}
    - contents: |
        # Managed by Salt (chatmail formula): chatmail:dovecot:packages is {{ d.packages }}.
        Package: dovecot-*
        Pin: {{ pins[d.packages] }}
        Pin-Priority: 1001

chatmail-dovecot-packages-index:
  cmd.run:
    - name: apt-get -q update
    - onchanges:
      - file: chatmail-dovecot-packages-list
      - file: chatmail-dovecot-packages-pin
{%- if d.packages == "patched" %}
      - file: chatmail-dovecot-packages-repo
{%- endif %}
{%- if d.packages == "upstream" %}
{%-   set debs = [] %}
{%-   for package in packages %}
{%-     set sha256 = d.upstream.sha256[package].get(d.arch) %}
{%-     if not sha256 %}
{{-       raise("chatmail: dovecot:upstream has no " ~ package ~ " for architecture " ~ d.arch) }}
{%-     endif %}
{%-     set deb = d.upstream.dir ~ "/" ~ package ~ "_" ~ d.arch ~ ".deb" %}
{%-     do debs.append({package: deb}) %}

chatmail-dovecot-packages-{{ package }}-deb:
  file.managed:
    - name: {{ deb }}
    - source: {{ d.upstream.url | replace("{package}", package) | replace("{arch}", d.arch) }}
    - source_hash: sha256={{ sha256 }}
    - makedirs: True
    - mode: "0644"
    - require_in:
      - pkg: chatmail-dovecot-packages
{%-   endfor %}

chatmail-dovecot-packages:
  pkg.installed:
    - sources: {{ debs | json }}
    - require:
      - file: chatmail-dovecot-packages-pin
{%- else %}

{#- pkg.installed leaves an installed package alone: after a change of dovecot:packages the
    installed version differs from apt's candidate (the pinned one) until this replaces it.
    Packages not installed yet come with the others in chatmail.packages. #}
chatmail-dovecot-packages:
  cmd.run:
    - name: >-
        DEBIAN_FRONTEND=noninteractive apt-get -q -y --allow-downgrades --no-install-recommends
        -o Dpkg::Options::=--force-confold install {{ packages | join(" ") }}
    - unless: >-
        for p in {{ packages | join(" ") }}; do
        v=$(dpkg-query -W -f='${Version}' $p 2>/dev/null) || continue;
        [ "$v" = "$(apt-cache policy $p | sed -n 's/^ *Candidate: //p')" ] || exit 1; done
    - require:
      - cmd: chatmail-dovecot-packages-index
      - file: chatmail-dovecot-packages-list
      - file: chatmail-dovecot-packages-pin
{%- endif %}
